"""The deploy step against real app processes: start, reload in place, survive a bad model."""

from __future__ import annotations

import pytest
from test_app import (
    CHAMPION_URI,
    app_store,
    exported_template,
    free_tcp_port,
    register_version,
)

from skinsense.config import ServeConfig
from skinsense.serving.deploy import (
    PID_FILE,
    DeployError,
    check_prediction,
    deploy_app,
    health,
    stop_app,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def store(tmp_path):
    with app_store(tmp_path / "home") as store:
        yield store


@pytest.fixture
def template(tmp_path_factory):
    return exported_template(tmp_path_factory)


def test_deploy_starts_the_app_then_reloads_it_and_never_drops_a_working_model(store, template,
                                                                               tmp_path):
    app_dir, port = tmp_path / "app", free_tcp_port()
    url = f"http://127.0.0.1:{port}"
    # The watcher is off so that each new version reaches the app through the deploy step.
    deploy = dict(app_dir=app_dir, host="127.0.0.1", port=port, env=store.env,
                  serve_config=ServeConfig(reload_interval_s=0), startup_timeout_s=120)
    v1 = register_version(store, template)
    try:
        first = deploy_app(CHAMPION_URI, expected_version=v1, **deploy)
        assert (first.action, first.version, first.url) == ("started", v1, url)
        assert first.top_class and (app_dir / PID_FILE).read_text() == str(first.pid)
        assert health(url)["reload_interval_s"] == 0  # the serve config reached the app

        v2 = register_version(store, template)
        second = deploy_app(CHAMPION_URI, expected_version=v2, **deploy)
        assert (second.action, second.version, second.pid) == ("reloaded", v2, first.pid)

        broken = register_version(store, template, broken=True)
        with pytest.raises(DeployError, match=f"keeps serving version {v2}.*version {broken} "
                                              f"failed to load"):
            deploy_app(CHAMPION_URI, expected_version=broken, **deploy)
        state = health(url)
        assert state["version"] == v2 and f"version {broken}" in state["reload_error"]
        assert check_prediction(url)
        assert (app_dir / PID_FILE).read_text() == str(first.pid)

        with pytest.raises(DeployError, match="another port"):
            deploy_app("models:/other@champion", expected_version=None, **deploy)
        assert health(url)["version"] == v2
    finally:
        stop_app(app_dir)
    assert health(url) is None and not (app_dir / PID_FILE).exists()


def test_an_app_that_cannot_start_fails_the_deploy_and_leaves_nothing_running(store, tmp_path):
    app_dir, port = tmp_path / "app", free_tcp_port()
    # No version is registered: there is no champion to serve.
    with pytest.raises(DeployError, match="the app exited(.|\n)*skin"):
        deploy_app(CHAMPION_URI, expected_version="1", app_dir=app_dir, host="127.0.0.1",
                   port=port, env=store.env, startup_timeout_s=120)
    assert not (app_dir / PID_FILE).exists()
    assert health(f"http://127.0.0.1:{port}") is None

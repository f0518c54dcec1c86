"""The Prefect UI in headless Chromium: an operator finds the `manual` deployment and starts
a run from its page (Run -> Quick run); the run shows up in the API; the Custom run form
shows every default the flow uses."""

from __future__ import annotations

import shutil
import socket
import time

import pytest

from skinsense.config import DEFAULT_ARCHS, DEFAULT_DATAVERSE_URL

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def prefect_ui(tmp_path, monkeypatch):
    """A Prefect server on loopback with both deployments registered (no runner: the run we
    start stays Scheduled, so nothing heavy runs)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.definitions import to_deployments
    from flows.pipeline import skinsense_pipeline
    from skinsense import stack

    monkeypatch.delenv("PREFECT_HOME", raising=False)
    # As the stack's runner does: the deployments then carry partial parameters (the app's
    # port), and the form fills the rest from the schema's defaults.
    monkeypatch.setenv("SKINSENSE_APP_PORT", "7860")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        stack.up(tmp_path, prefect_port=port, parts=(stack.PREFECT,))
        url = f"http://127.0.0.1:{port}"
        with temporary_settings(updates={PREFECT_API_URL: f"{url}/api"}):
            for deployment in to_deployments(skinsense_pipeline):
                deployment.apply()
            with get_client(sync_client=True) as client:
                yield url, client
    finally:
        stack.down(tmp_path)


def test_quick_run_from_the_deployment_page_creates_a_flow_run(prefect_ui, tmp_path):
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    url, client = prefect_ui
    deployment = client.read_deployment_by_name("skinsense-pipeline/manual")
    # Only runs of `manual` count: the scheduler creates the upcoming weekly runs of
    # `scheduled-retraining` by itself.
    manual_runs = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]))
    assert client.read_flow_runs(flow_run_filter=manual_runs) == []

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{url}/deployments")
            page.get_by_role("link", name="manual", exact=True).first.click()
            page.wait_for_url(f"**/deployments/deployment/{deployment.id}**")
            page.get_by_role("button", name="Run", exact=True).click()  # not the sidebar's "Runs"
            page.get_by_text("Quick run", exact=True).click()
            try:
                # The UI's own confirmation: "<run name> scheduled to start now".
                page.get_by_text("scheduled to start").first.wait_for()
            except sync_api.TimeoutError:
                page.screenshot(path=tmp_path / "after-quick-run.png")
                pytest.fail("no confirmation 60 s after Quick run; the page said:\n"
                            + page.inner_text("body")[:2000])
            # A loaded machine (the whole suite on two cores) can take a while to answer.
            deadline = time.monotonic() + 60
            runs = []
            while not runs and time.monotonic() < deadline:
                runs = client.read_flow_runs(flow_run_filter=manual_runs)
                time.sleep(0.5)

            # Custom run: the form shows what a run with it would train and fetch.
            page.goto(f"{url}/deployments/deployment/{deployment.id}/run")
            page.get_by_text("Archs", exact=False).first.wait_for()
            values = page.eval_on_selector_all("textarea, input", "els => els.map(e => e.value)")
            if not set(DEFAULT_ARCHS) <= set(values):
                page.screenshot(path=tmp_path / "custom-run.png", full_page=True)
            assert set(DEFAULT_ARCHS) <= set(values), values
            assert DEFAULT_DATAVERSE_URL in values
        finally:
            browser.close()
    assert len(runs) == 1
    assert runs[0].deployment_id == deployment.id
    assert runs[0].state.is_scheduled()

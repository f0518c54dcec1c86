"""The team stack on PostgreSQL with its logins on, end to end.

One stack for the whole module: a private PostgreSQL server (Debian's binaries, its own port
and data folder) holds Prefect's database, MLflow's backend store and MLflow's user
database; `skinsense stack up --auth` runs the Prefect server, the MLflow server (basic-auth
app), and the deployment runner on loopback. The tests then show that strangers get 401 and
change nothing, that a deployment run completes, registers and promotes (read back through
both servers and straight from Postgres), and that both servers and the runner come back
after Postgres restarts.
"""

from __future__ import annotations

import stat
import time

import pytest
import requests

from local_postgres import LocalPostgres, unavailable_reason
from skinsense import stack
from skinsense.stack import auth as stack_auth
from flow_runs import tiny_parameters, wait_final
from test_stack import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MANUAL = "skinsense-pipeline/manual"
SECRET_ENVS = (*stack_auth.SERVER_SECRET_ENVS, stack_auth.PREFECT_CLIENT_AUTH_ENV,
               stack_auth.MLFLOW_USERNAME_ENV, stack_auth.MLFLOW_PASSWORD_ENV,
               stack_auth.PREFECT_DATABASE_ENV, stack_auth.MLFLOW_BACKEND_STORE_ENV,
               stack_auth.MLFLOW_AUTH_DATABASE_ENV)


@pytest.fixture(scope="module")
def postgres():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    (port,) = free_ports(1)
    server = LocalPostgres(port)
    try:
        server.start()
        server.create_databases("prefect", "mlflow", "mlflow_auth")
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def team_stack(postgres, module_tmp):
    """The stack on Postgres with logins on; an authenticated Prefect client on it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from skinsense.paths import Home
    from skinsense.serving.deploy import stop_app

    root = module_tmp("team-home")
    prefect_port, mlflow_port, app_port = free_ports(3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKINSENSE_HOME", str(root))
        for name in ("PREFECT_HOME", "MLFLOW_TRACKING_URI", *SECRET_ENVS):
            mp.delenv(name, raising=False)  # the stack generates its secrets itself
        try:
            stack.up(root, prefect_port=prefect_port, mlflow_port=mlflow_port,
                     app_port=app_port, with_app=False, auth=True,
                     prefect_database_url=postgres.url("prefect", "postgresql+asyncpg"),
                     mlflow_backend_store_uri=postgres.url("mlflow"),
                     mlflow_auth_database_uri=postgres.url("mlflow_auth"))
            credentials = stack_auth.load_credentials(stack.credentials_file(root))
            # This process is a client too: MLflow's client reads its login from here.
            for key, value in credentials.client_env().items():
                mp.setenv(key, value)
            api = f"http://127.0.0.1:{prefect_port}/api"
            with temporary_settings(updates={PREFECT_API_URL: api,
                                             PREFECT_API_AUTH_STRING: credentials.prefect_auth_string}):
                with get_client(sync_client=True) as client:
                    yield {"client": client, "root": root, "api": api,
                           "mlflow": f"http://127.0.0.1:{mlflow_port}",
                           "credentials": credentials, "postgres": postgres,
                           "ports": {"prefect_port": prefect_port, "mlflow_port": mlflow_port,
                                     "app_port": app_port}}
        finally:
            stop_app(Home(root).app)
            stack.down(root)


def mlflow_client(team_stack):
    from mlflow import MlflowClient

    # Both URIs: another test may have set this process's default registry elsewhere.
    return MlflowClient(tracking_uri=team_stack["mlflow"], registry_uri=team_stack["mlflow"])


def answer(method: str, url: str, headers: dict | None = None, **kwargs) -> requests.Response:
    return requests.request(method, url, headers=headers or {}, timeout=30, **kwargs)


def manual_runs(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return client.read_flow_runs(deployment_filter=DeploymentFilter(
        id=DeploymentFilterId(any_=[deployment_id])))


def test_strangers_get_401_and_change_nothing(team_stack, capsys):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings

    client, api, mlflow = team_stack["client"], team_stack["api"], team_stack["mlflow"]
    credentials = team_stack["credentials"]
    # The secrets were generated and stored for the owner's eyes only, never in stack.json.
    path = stack.credentials_file(team_stack["root"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    settings = (team_stack["root"] / "stack" / "stack.json").read_text()
    assert credentials.mlflow_password not in settings
    assert team_stack["postgres"].password not in settings
    assert credentials.prefect_auth_string.split(":", 1)[1] not in settings
    assert stack.describe(team_stack["root"])["auth"] is True

    deployment = client.read_deployment_by_name(MANUAL)
    before = manual_runs(client, deployment.id)
    strangers = [{}, stack_auth.basic_auth_header("admin", "not-the-password-at-all"),
                 {"Authorization": "Bearer not-a-token"}]
    for headers in strangers:
        assert answer("GET", f"{api}/deployments/{deployment.id}", headers).status_code == 401
        assert answer("POST", f"{api}/flow_runs/filter", headers, json={}).status_code == 401
        assert answer("POST", f"{api}/deployments/{deployment.id}/create_flow_run", headers,
                      json={}).status_code == 401
        assert answer("DELETE", f"{api}/deployments/{deployment.id}", headers).status_code == 401
    # Probes stay open (process managers and load balancers use them).
    assert answer("GET", f"{api}/health").status_code == 200
    # Prefect's own client with a wrong auth string is refused the same way.
    with temporary_settings(updates={PREFECT_API_AUTH_STRING: "admin:not-the-password-at-all"}):
        with get_client(sync_client=True) as intruder:
            with pytest.raises(PrefectHTTPStatusError) as refused:
                intruder.read_deployment_by_name(MANUAL)
    assert refused.value.response.status_code == 401
    assert client.read_deployment(deployment.id).name == "manual"
    assert manual_runs(client, deployment.id) == before

    mlflow_strangers = [{}, stack_auth.basic_auth_header(credentials.mlflow_username,
                                                         "not-the-password-at-all"),
                        # MLflow's old published default admin password.
                        stack_auth.basic_auth_header("admin", "password1234")]
    for headers in mlflow_strangers:
        for method, path_, body in [
                ("POST", "registered-models/create", {"name": "intruder"}),
                ("POST", "experiments/create", {"name": "intruder"}),
                ("GET", "registered-models/search", None),
                ("POST", "users/create", {"username": "intruder", "password": "x" * 16})]:
            response = answer(method, f"{mlflow}/api/2.0/mlflow/{path_}", headers, json=body)
            assert response.status_code == 401, (method, path_, response.text[:200])
    ui = answer("GET", f"{mlflow}/")
    assert ui.status_code == 401 and ui.headers["WWW-Authenticate"].startswith("Basic")
    assert answer("GET", f"{mlflow}/health").status_code == 200

    admin = mlflow_client(team_stack)
    assert admin.search_registered_models(filter_string="name = 'intruder'") == []
    assert admin.get_experiment_by_name("intruder") is None
    assert answer("GET", f"{mlflow}/api/2.0/mlflow/users/get", credentials.mlflow_headers(),
                  params={"username": "intruder"}).status_code == 404

    # The CLI says what is missing instead of "no such model".
    import mlflow as mlflow_lib

    from skinsense.cli import main

    uris = mlflow_lib.get_tracking_uri(), mlflow_lib.get_registry_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow)
        mp.delenv("MLFLOW_TRACKING_USERNAME")
        mp.delenv("MLFLOW_TRACKING_PASSWORD")
        try:
            assert main(["registry", "show"]) == 1
            assert f"MLflow at {mlflow} asks for a login" in capsys.readouterr().err
            mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            mp.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password-at-all")
            assert main(["registry", "rollback"]) == 1
            assert "refused the login of 'admin'" in capsys.readouterr().err
        finally:  # main() pointed this process's MLflow at the server
            mlflow_lib.set_tracking_uri(uris[0])
            mlflow_lib.set_registry_uri(uris[1])

    # `stack up` given an admin password the user database was not created with: a clear
    # refusal, and the stored login that works is kept.
    stored = path.read_text()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "another-admin-password")
        with pytest.raises(stack.StackError, match="created with another password"):
            stack.up(team_stack["root"], parts=(stack.MLFLOW,), **team_stack["ports"])
    assert path.read_text() == stored
    assert stack.describe(team_stack["root"])["databases"]["mlflow"].startswith("postgresql://")


def test_a_deployment_run_on_postgres_registers_and_promotes(team_stack, synthetic_sample):
    from skinsense.paths import Home
    from skinsense.serving.deploy import health, stop_app

    client, postgres = team_stack["client"], team_stack["postgres"]
    credentials = team_stack["credentials"]
    deployment = client.read_deployment_by_name(MANUAL)
    (port,) = free_ports(1)
    try:
        created = client.create_flow_run_from_deployment(
            deployment.id, parameters=tiny_parameters(synthetic_sample, port))
        run = wait_final(client, created.id, timeout_s=420)
        assert run.state.is_completed(), \
            f"{run.state}: see {team_stack['root']}/stack/runner.log"

        # Read back through the servers.
        mlflow = mlflow_client(team_stack)
        experiment = mlflow.get_experiment_by_name("skinsense")
        runs = mlflow.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.prefect_flow_run_id = '{created.id}'")
        parent = next(r for r in runs if r.data.tags.get("skinsense.kind") == "pipeline")
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert parent.info.status == "FINISHED"
        assert [c.info.run_name for c in children] == ["resnet18"]
        assert "test_balanced_accuracy" in children[0].data.metrics
        champion = mlflow.get_model_version_by_alias("skinsense", "champion")
        assert champion.run_id in {parent.info.run_id, children[0].info.run_id}
        # The app the run deployed loaded the champion through the login too.
        state = health(f"http://127.0.0.1:{port}")
        assert state is not None and str(state["version"]) == str(champion.version)

        # Issue 21: on Postgres, the app's log and the CLI's confirmed diagnoses go to the
        # database `skinsense` on the same server (created by `stack up`), found through a
        # 0600 file of the home, not to SQLite.
        check_the_log_is_on_postgres(team_stack, f"http://127.0.0.1:{port}")
    finally:
        stop_app(Home(team_stack["root"]).app)

    # Straight from Postgres: the rows behind what the servers said.
    assert postgres.query("prefect", "SELECT state_type FROM flow_run WHERE id = %s",
                          (str(created.id),)) == [("COMPLETED",)]
    # The pipeline's two deployments and the monitor's (skinsense-monitor/daily).
    assert postgres.query("prefect", "SELECT name FROM deployment ORDER BY name") == \
        [("daily",), ("manual",), ("scheduled-retraining",)]
    assert postgres.query("mlflow", "SELECT status FROM runs WHERE run_uuid = %s",
                          (parent.info.run_id,)) == [("FINISHED",)]
    assert postgres.query(
        "mlflow", "SELECT version FROM registered_model_aliases "
        "WHERE name = 'skinsense' AND alias = 'champion'") == [(int(champion.version),)]
    users = postgres.query("mlflow_auth", "SELECT username, is_admin, password_hash FROM users")
    assert [(u, admin) for u, admin, _ in users] == [(credentials.mlflow_username, True)]
    assert credentials.mlflow_password not in users[0][2]  # a hash, not the password

    # A stranger cannot move the champion; nor can a signed-in user with the default (read)
    # permission, whom the admin created.
    mlflow_api = f"{team_stack['mlflow']}/api/2.0/mlflow"
    alias = {"name": "skinsense", "alias": "champion"}
    for headers in ({}, stack_auth.basic_auth_header("admin", "not-the-password-at-all")):
        assert answer("DELETE", f"{mlflow_api}/registered-models/alias", headers,
                      json=alias).status_code == 401
    viewer = {"username": "viewer", "password": "viewer-password-123"}
    assert answer("POST", f"{mlflow_api}/users/create", credentials.mlflow_headers(),
                  json=viewer).status_code == 200
    viewer_headers = stack_auth.basic_auth_header(viewer["username"], viewer["password"])
    assert answer("GET", f"{mlflow_api}/registered-models/get", viewer_headers,
                  params={"name": "skinsense"}).status_code == 200
    assert answer("DELETE", f"{mlflow_api}/registered-models/alias", viewer_headers,
                  json=alias).status_code == 403
    assert mlflow.get_model_version_by_alias("skinsense", "champion").version == champion.version


def test_servers_and_runner_recover_from_a_postgres_restart(team_stack, synthetic_sample):
    client, api, postgres = team_stack["client"], team_stack["api"], team_stack["postgres"]
    mlflow_search = f"{team_stack['mlflow']}/api/2.0/mlflow/experiments/search"
    admin = team_stack["credentials"].mlflow_headers()
    deployment = client.read_deployment_by_name(MANUAL)

    # An idle moment: no run in flight. Postgres goes away as under a service restart.
    postgres.stop("fast")
    try:
        assert answer("GET", f"{api}/ready").status_code == 503
        assert answer("GET", mlflow_search, admin, params={"max_results": 1}).status_code >= 500
        time.sleep(3)  # long enough for the servers' background loops to notice
    finally:
        postgres.start()

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (answer("GET", f"{api}/ready").status_code == 200
                and answer("GET", mlflow_search, admin,
                           params={"max_results": 1}).status_code == 200):
            break
        time.sleep(1)
    else:
        pytest.fail("the servers did not recover within 120 s of Postgres restarting; see "
                    f"{team_stack['root']}/stack/*.log")
    records = {r["name"]: r for r in stack.status(team_stack["root"])}
    for name in (stack.PREFECT, stack.MLFLOW, stack.RUNNER):
        assert records[name]["healthy"], records[name]

    (port,) = free_ports(1)
    created = client.create_flow_run_from_deployment(
        deployment.id, parameters=tiny_parameters(synthetic_sample, port, deploy=False))
    run = wait_final(client, created.id, timeout_s=420)
    assert run.state.is_completed(), f"{run.state}: see {team_stack['root']}/stack/runner.log"
    assert postgres.query("prefect", "SELECT state_type FROM flow_run WHERE id = %s",
                          (str(created.id),)) == [("COMPLETED",)]
    parents = postgres.query(
        "mlflow", "SELECT r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
        "WHERE t.key = 'prefect_flow_run_id' AND t.value = %s", (str(created.id),))
    assert parents and all(status == "FINISHED" for (status,) in parents)


def check_the_log_is_on_postgres(team_stack, app_url: str) -> None:
    import sqlalchemy as sa
    from gradio_client import Client, handle_file

    from skinsense.cli import main
    from skinsense.serving.app import example_images

    root, postgres = team_stack["root"], team_stack["postgres"]
    recorded = root / "stack" / "log-database.url"
    assert stat.S_IMODE(recorded.stat().st_mode) == 0o600
    assert postgres.password not in (root / "stack" / "stack.json").read_text()
    assert stack.describe(root)["databases"]["log"].endswith("/skinsense")
    image = example_images()[0]
    Client(app_url, verbose=False).predict(handle_file(str(image)), api_name="/assess")
    assert main(["feedback", "add", str(image), "--dx", "mel", "--dx-type", "histo"]) == 0
    engine = sa.create_engine(postgres.url("skinsense"))
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text(
                "SELECT count(*) FROM predictions WHERE endpoint = 'assess'")).scalar() >= 1
            assert connection.execute(sa.text("SELECT dx FROM feedback")).scalars().all() == \
                ["mel"]
    finally:
        engine.dispose()
    assert not (root / "monitoring" / "monitoring.db").exists()

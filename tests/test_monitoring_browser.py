"""After deployment in a real browser (headless Chromium): the feedback form in the app, and
the monitoring artifact (table and plots) in the Prefect UI."""

from __future__ import annotations

import socket

import pytest
import sqlalchemy as sa
from test_app import exported_template, running_app
from test_app_browser import browser, screenshot_dir  # noqa: F401 (the browser fixture)

from skinsense.monitoring.database import Feedback, engine_for
from skinsense.serving.app import example_images

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_clinician_enters_a_confirmed_diagnosis_in_the_app(browser, home,  # noqa: F811
                                                              tmp_path_factory, tmp_path):
    model_dir = exported_template(tmp_path_factory)
    shots = screenshot_dir(tmp_path)
    with running_app(str(model_dir), tmp_path / "app.log",
                     env={"SKINSENSE_HOME": str(home.root)},
                     serve_config={"reload_interval_s": 0, "keep_images": True}) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(url, wait_until="networkidle")
        page.locator("input[type=file]").first.set_input_files(str(example_images()[0]))
        page.locator("#classify").click()
        page.locator("#details").get_by_text("Answered by").wait_for(timeout=30_000)
        page.get_by_text("Confirmed diagnosis (clinicians)").click()
        # Nothing is preselected: an untouched form must not file a class or a patient.
        for field in ("#feedback-dx", "#feedback-dx-type", "#feedback-sex", "#feedback-site"):
            assert page.locator(f"{field} input").input_value() == "", field
        page.locator("#feedback-dx input").click()
        page.get_by_role("option", name="Melanoma (mel)").click()
        page.locator("#feedback-dx-type input").click()
        page.get_by_role("option", name="histo").click()
        # On loopback no login is asked for.
        assert page.locator("#feedback-user").is_hidden()
        page.locator("#feedback-save").click()
        page.locator("#feedback-status").get_by_text("Saved: Melanoma").wait_for(timeout=30_000)
        assert "kept for training" in page.inner_text("#feedback-status")
        page.screenshot(path=str(shots / "feedback-form.png"), full_page=True)
    with engine_for(f"sqlite:///{home.root / 'monitoring' / 'monitoring.db'}").connect() as c:
        # The optional fields left alone are stored as unknown, not as the first choice.
        assert c.execute(sa.select(Feedback.dx, Feedback.dx_type, Feedback.age, Feedback.sex,
                                   Feedback.localization)).all() == [
            ("mel", "histo", None, None, None)]


def test_the_monitoring_artifact_shows_its_table_and_plots_in_the_prefect_ui(
        browser, home, tmp_path_factory, tmp_path, monkeypatch):  # noqa: F811
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from test_app import MODEL_NAME
    from test_monitoring import insert, register_champion, window

    from flows.monitor import skinsense_monitor
    from skinsense import stack
    from skinsense.config import MonitorConfig

    register_champion(home, tmp_path_factory)
    insert(window(200, drifted=True))
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shots = screenshot_dir(tmp_path)
    try:
        stack.up(tmp_path / "stack-home", prefect_port=port, parts=(stack.PREFECT,))
        url = f"http://127.0.0.1:{port}"
        with temporary_settings(updates={PREFECT_API_URL: f"{url}/api"}):
            skinsense_monitor(MonitorConfig(model_name=MODEL_NAME))
            with get_client(sync_client=True) as client:
                latest = client.request("POST", "/artifacts/latest/filter", json={
                    "artifacts": {"key": {"any_": ["skinsense-monitoring"]}}}).json()[0]
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        # The key's page lists its versions; the newest one's page shows its markdown.
        page.goto(f"{url}/artifacts/key/skinsense-monitoring", wait_until="networkidle")
        page.get_by_text("Prediction log against the champion's test part").first.wait_for(
            timeout=30_000)
        page.goto(f"{url}/artifacts/artifact/{latest['latest_id']}", wait_until="networkidle")
        try:
            page.get_by_text("SkinSense monitoring").first.wait_for(timeout=30_000)
        except Exception:
            page.screenshot(path=str(shots / "monitoring-artifact-failed.png"), full_page=True)
            raise AssertionError(page.url + "\n" + page.inner_text("body")[:3000]) from None
        assert "class_mix_psi" in page.inner_text("body")
        images = page.locator("img[alt='class_mix'], img[alt='over_time'], img[alt='ood_scores']")
        images.first.wait_for(timeout=30_000)
        assert images.count() == 3
        widths = images.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
        assert all(w > 100 for w in widths), widths  # the PNGs decoded, not broken links
        page.screenshot(path=str(shots / "monitoring-artifact.png"), full_page=True)
    finally:
        stack.down(tmp_path / "stack-home")

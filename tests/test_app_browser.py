"""The app in a real browser: headless Chromium uploads a real sample and reads the answer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_app import exported_template, running_app

from skinsense.labels import CLASS_CODES
from skinsense.serving.app import example_images, label_text

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def browser():
    if not CHROMIUM.exists() and not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (`./run test` installs it as root: "
                    "apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install -e .[test])")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")),
            args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def test_upload_classify_and_read_the_top_label(browser, tmp_path_factory, tmp_path):
    model_dir = exported_template(tmp_path_factory)
    with running_app(str(model_dir), tmp_path / "app.log") as url:
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(url, wait_until="networkidle")
        assert "not a diagnosis" in page.inner_text("#disclaimer")
        assert "resnet18" in page.inner_text("#model-footer")
        page.locator("input[type=file]").first.set_input_files(str(example_images()[0]))
        page.locator("#classify").click()
        top = page.locator("#top3 [data-testid='label-output-value']")
        top.wait_for(state="visible", timeout=30_000)
        assert top.inner_text().strip() in {label_text(code) for code in CLASS_CODES}
        page.locator("#details").get_by_text("Answered by").wait_for(timeout=10_000)
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)

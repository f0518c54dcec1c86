"""The app in a real browser: headless Chromium uploads images and reads what a user reads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_app import exported_template, non_dermatoscopic_photo, running_app

from skinsense.labels import CLASS_CODES
from skinsense.serving.answers import label_text

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


def screenshot_dir(tmp_path: Path) -> Path:
    """Where the screenshots of each state go: $SKINSENSE_SCREENSHOTS (to look at them),
    else the test's temporary folder."""
    folder = Path(os.environ.get("SKINSENSE_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_a_user_sees_the_gate_the_referral_banner_and_the_explanation(
        browser, tmp_path_factory, tmp_path):
    """Upload a photo of a cat: the out-of-domain message and no class list until "Show
    anyway". Then a real example: the top 3, the referral banner and, on request, the
    Grad-CAM explanation."""
    model_dir = exported_template(tmp_path_factory)
    shots = screenshot_dir(tmp_path)
    photo = non_dermatoscopic_photo(tmp_path)
    with running_app(str(model_dir), tmp_path / "app.log") as url:
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(url, wait_until="networkidle")
        assert "not a diagnosis" in page.inner_text("#disclaimer")
        assert "resnet18" in page.inner_text("#model-footer")
        assert "out-of-domain gate on" in page.inner_text("#model-footer")

        # 1. Not a dermatoscopic image: a plain message, no classification.
        page.locator("input[type=file]").first.set_input_files(str(photo))
        page.locator("#classify").click()
        page.locator("#verdict").get_by_text("does not look like a dermatoscopic image").wait_for(
            timeout=30_000)
        assert "no classification is given" in page.inner_text("#verdict")
        assert page.locator("#top3").is_hidden()
        assert page.locator("#anyway-top3").is_hidden()  # folded away
        page.screenshot(path=str(shots / "1-out-of-domain.png"), full_page=True)
        page.get_by_text("Show anyway (unreliable)").click()
        page.locator("#anyway-top3").wait_for(state="visible", timeout=10_000)
        assert "Unreliable" in page.inner_text("#show-anyway")
        page.screenshot(path=str(shots / "2-show-anyway.png"), full_page=True)

        # 2. A real example, picked from the examples as a user would.
        page.get_by_label("Remove Image").click()
        page.locator(".gallery-item, [data-testid='example'] button, button.gallery-item"
                     ).nth(0).click()
        page.locator("#classify").click()
        top = page.locator("#top3 [data-testid='label-output-value']")
        top.wait_for(state="visible", timeout=30_000)
        assert top.inner_text().strip() in {label_text(code) for code in CLASS_CODES}
        verdict = page.inner_text("#verdict")
        assert "Higher risk: please see a dermatologist soon" in verdict or (
            "Lower risk: no sign of the malignant classes this model knows" in verdict)
        assert page.locator("#show-anyway").is_hidden()
        page.locator("#details").get_by_text("Answered by").wait_for(timeout=10_000)
        page.screenshot(path=str(shots / "3-in-domain-referral.png"), full_page=True)

        # 3. The explanation, on demand.
        page.locator("#explain").click()
        overlay = page.locator("#explanation img")
        overlay.wait_for(state="visible", timeout=60_000)
        page.locator("#explanation-caption").get_by_text("Grad-CAM for").wait_for(timeout=10_000)
        size = overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert size == [600, 450]  # the example's own size
        page.screenshot(path=str(shots / "4-explanation.png"), full_page=True)

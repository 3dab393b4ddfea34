"""End to end in a real browser: Debian's headless Chromium driven by Playwright.

`.ci/run` installs Chromium and sets DIFFLAB_REQUIRE_BROWSER=1, so there a missing browser
fails the test instead of skipping it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("DIFFLAB_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def test_sample_from_a_tiny_run_and_see_the_image(server, browser, tmp_path):
    lab, url, _, _ = server
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url, wait_until="load")
    page.get_by_role("tab", name="Sample").wait_for(timeout=30_000)
    page.get_by_role("tab", name="Sample").click()
    assert page.locator("#sample-run input").input_value() == "tiny"
    page.locator("#sample-go").click()
    status = page.locator("#sample-status textarea")
    page.wait_for_function(
        "() => document.querySelector('#sample-status textarea').value.includes('done')",
        timeout=60_000,
    )
    img = page.locator("#sample-image img")
    img.wait_for(state="visible", timeout=30_000)
    page.wait_for_function(
        "() => { const i = document.querySelector('#sample-image img');"
        " return i && i.complete && i.naturalWidth > 0; }",
        timeout=30_000,
    )
    shot = tmp_path / "sample.png"
    img.screenshot(path=str(shot))
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10  # an image of digits, not a blank box
    assert "80 samples in" in status.input_value()  # default: 8 per class, 10 classes
    assert page.locator("text=difflab sample").count() > 0  # the equivalent command is shown
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert not errors, errors
    page.close()

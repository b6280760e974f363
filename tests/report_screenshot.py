"""Open a report page in headless Chromium (Debian's), collect console errors and every image's
decoded size, and take a full-page screenshot. Used by tests/test_report.py; also a script:

    python tests/report_screenshot.py results/report/index.html /tmp/report.png
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> None:
    """For a test: skip without Debian's chromium, except on CI, where .ci/run installs it."""
    import os

    import pytest

    if chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing: .ci/run installs it")
        pytest.skip("Debian's chromium is not installed")


def inspect_page(page_file: Path, screenshot: Path) -> dict:
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(Path(page_file).resolve().as_uri(), wait_until="load")
        images = page.eval_on_selector_all(
            "img",
            "els => els.map(e => ({alt: e.alt, width: e.naturalWidth, height: e.naturalHeight, complete: e.complete}))",
        )
        headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return {"console_errors": errors, "images": images, "headings": headings}


if __name__ == "__main__":
    print(json.dumps(inspect_page(Path(sys.argv[1]), Path(sys.argv[2])), indent=2, ensure_ascii=False))

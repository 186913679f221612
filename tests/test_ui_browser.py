"""End to end in a real headless browser: Playwright drives Debian's Chromium against `glmv ui --model tiny`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import REPO

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (scripts/setup --test installs it)"),
]


@pytest.fixture(scope="module")
def ui(tiny_path, tmp_path_factory):
    from test_server import free_port

    out = tmp_path_factory.mktemp("html")
    port = free_port()
    log = open(out.parent / f"ui-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "glmv.cli", "ui", "--model", "tiny", "--port", str(port), "--out", str(out)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        raise RuntimeError("glmv ui did not start")
    yield url, out
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(ui, browser):
    url, _ = ui
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_function("document.querySelector('#glmv-status') && "
                           "document.querySelector('#glmv-status').innerText.includes('ready')", timeout=60000)
    yield page
    page.close()


def finished(page, stats_id, timeout=90000):
    page.wait_for_function(
        f"(() => {{ const t = document.querySelector('#{stats_id}').innerText; return t.includes('✓') || t.includes('■'); }})()",
        timeout=timeout)
    return page.inner_text(f"#{stats_id}")


def open_tab(page, name):
    page.get_by_role("tab", name=name).click()


def test_describe_streams_an_answer(page):
    page.locator("#describe-image input[type=file]").set_input_files(str(REPO / "input" / "image_1.png"))
    page.fill("#max-new input[type=number]", "40")
    page.press("#max-new input[type=number]", "Enter")
    page.click("#describe-run")
    stats = finished(page, "describe-stats")
    assert stats.startswith("✓") and "40 tokens" in stats and "tok/s" in stats
    assert page.inner_text("#describe-answer").strip()


def test_stop_really_stops_and_the_app_stays_ready(page):
    page.locator("#describe-image input[type=file]").set_input_files(str(REPO / "input" / "image_1.png"))
    page.fill("#max-new input[type=number]", "8192")
    page.press("#max-new input[type=number]", "Enter")
    page.click("#describe-run")
    page.wait_for_function("document.querySelector('#describe-stats').innerText.startsWith('…')", timeout=60000)
    page.click("#describe-stop")
    stats = finished(page, "describe-stats", timeout=30000)
    assert stats.startswith("■ stopped")
    n = int(stats.split("·")[1].split()[0])
    assert n < 8192
    time.sleep(1.0)
    assert page.inner_text("#describe-stats") == stats  # nothing more arrives after the stop
    page.fill("#max-new input[type=number]", "16")
    page.press("#max-new input[type=number]", "Enter")
    page.click("#describe-run")  # and the next request runs normally
    page.wait_for_function("document.querySelector('#describe-stats').innerText.includes('16 tokens')", timeout=60000)


def test_ocr_tab(page):
    open_tab(page, "OCR")
    page.locator("#ocr-image input[type=file]").set_input_files(str(REPO / "input" / "image_2.png"))
    page.fill("#max-new input[type=number]", "24")
    page.press("#max-new input[type=number]", "Enter")
    page.click("#ocr-run")
    assert finished(page, "ocr-stats").startswith("✓")
    assert page.inner_text("#ocr-rendered").strip()
    page.get_by_role("tab", name="Raw text").click()
    assert page.locator("#ocr-raw textarea").input_value().strip()


def test_html_tab_writes_the_file_and_previews_in_a_sandbox(page, ui):
    _, out = ui
    before = set(out.glob("generated_*.html"))
    open_tab(page, "Image → HTML")
    page.locator("#html-image input[type=file]").set_input_files(str(REPO / "input" / "image_3.png"))
    page.fill("#max-new input[type=number]", "24")
    page.press("#max-new input[type=number]", "Enter")
    page.click("#html-run")
    finished(page, "html-stats")
    new = set(out.glob("generated_*.html")) - before
    assert len(new) == 1
    frame = page.locator("#html-preview iframe")
    frame.wait_for(timeout=10000)
    sandbox = frame.get_attribute("sandbox")
    assert sandbox is not None and "allow-same-origin" not in sandbox
    if shutil.which("tesseract"):
        # the visual feedback loop: render in Chromium, score against the screenshot, show both
        page.click("#html-refine")
        page.wait_for_function("document.querySelector('#html-stats').innerText.includes('visual score')",
                               timeout=120000)
        page.locator("#html-compare img").nth(1).wait_for(timeout=10000)
    page.screenshot(path=str(out.parent / "html-tab.png"))


def test_chat_with_an_image(page):
    open_tab(page, "Chat")
    page.fill("#max-new input[type=number]", "12")
    page.press("#max-new input[type=number]", "Enter")
    page.locator("#chat-box input[type=file]").set_input_files(str(REPO / "input" / "image_1.png"))
    page.locator("#chat-box textarea").fill("what is in this picture?")
    page.locator("#chat-box textarea").press("Enter")
    assert finished(page, "chat-stats").startswith("✓")
    assert "what is in this picture?" in page.inner_text("#chat")

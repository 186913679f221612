"""Regenerate the web app's screenshots in docs/screenshots/: every tab at desktop and phone width.

    PYTHONPATH=src python scripts/screenshots.py

The app runs in-process over a scripted backend that answers like GLM-4.6V would (the answers are written
here, so the pictures show the layout with realistic content, not a model's quality). It needs gradio,
Playwright and Debian's chromium (and tesseract for the refine scores).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "screenshots"
INPUT = REPO / "input"
VIEWPORTS = {"desktop": (1280, 900), "phone": (390, 844)}

PAGE = """<!DOCTYPE html>
<html><head><style>
body{margin:0;font-family:'DejaVu Sans',sans-serif;background:#f5f6fa}
header{background:#1c2a4a;color:#fff;display:flex;justify-content:space-between;padding:20px 40px}
header b{font-size:28px} nav a{color:#dde;margin-left:36px;font-size:19px}
.hero{background:#3f78c9;color:#fff;padding:56px 80px} .hero h1{font-size:46px;margin:0 0 16px}
.hero p{font-size:21px;margin:0 0 30px}
.btn{background:#ffab2e;color:#1c2a4a;font-weight:bold;font-size:21px;padding:18px 38px;border-radius:8px;display:inline-block}
.cards{display:flex;gap:40px;padding:40px 80px} .card{background:#fff;border:1px solid #d5d9e6;border-radius:10px;padding:16px;flex:1}
.card div{height:140px;border-radius:6px} .card h3{font-size:26px;margin:14px 0 4px;color:#1c2a4a} .card p{margin:0;color:#555;font-size:19px}
</style></head><body>
<header><b>Skyline Travel</b><nav><a>Destinations</a><a>Deals</a><a>About</a><a>Contact</a></nav></header>
<section class="hero"><h1>Find your next adventure</h1><p>Flights, hotels and tours in 140 countries.</p>
<span class="btn">Search trips</span></section>
<div class="cards"><div class="card"><div style="background:#f0c87a"></div><h3>Lisbon</h3><p>from 129 EUR</p></div>
<div class="card"><div style="background:#e696a0"></div><h3>Kyoto</h3><p>from 689 EUR</p></div>
<div class="card"><div style="background:#9abde6"></div><h3>Reykjavik</h3><p>from 249 EUR</p></div></div>
</body></html>"""

OCR_ANSWER = """# Quarterly Report: Q3 2026

Northwind Trading Company

Revenue grew 12% over the previous quarter, driven by strong demand for outdoor equipment. Operating costs
stayed flat while shipping times fell from 5.2 to 3.8 days on average. The table below lists sales by region.

## 1. Sales by region

| Region | Units | Revenue (EUR) | Change |
|---|---|---|---|
| North | 1,240 | 186,000 | +8% |
| South | 980 | 147,500 | +15% |
| East | 1,530 | 229,400 | +11% |
| West | 760 | 114,200 | -3% |

## 2. Outlook

We expect demand to soften in Q4. Priorities:
- open the Lyon warehouse in November
- cut return processing time by 20%
- launch the spring catalogue early
"""


def script(request) -> str | list[str]:
    text = request.messages[-1].text
    if text.startswith("Find "):
        return ("<think>The house is the red building with a dark roof right of the centre, on the green hill."
                "</think>the red house: [[533,585,698,822]]\nthe tree: [[146,497,275,822]]")
    if "Compare them carefully" in text:
        return f"<think>The header is slightly too tall; the cards need their coloured tops.</think>```html\n{PAGE}\n```"
    if "HTML" in text:
        return (f"<think>A dark header with a logo and four links, a blue hero with a title, a line and an orange "
                f"button, then three cards.</think>```html\n{PAGE.replace('height:140px', 'height:120px')}\n```")
    if "Extract all the text" in text:
        return "<think>A report page: a title, a paragraph and a table.</think>" + OCR_ANSWER
    return ("<think>A calm landscape: sky, sun, hills, a tree and a house by the water.</think>"
            "A simple illustrated landscape: a pale blue sky with a yellow sun at the top right, rolling green "
            "hills, a round green tree on the left and a small red house with a dark brown roof in the middle, "
            "above a strip of blue water with light ripples.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.path.insert(0, str(REPO / "src"))
    from playwright.sync_api import sync_playwright

    from glmv.settings import Settings
    from glmv.testing.scripted import ScriptedBackend
    from glmv.ui.app import WebApp
    from glmv.ui.manager import ModelManager
    from glmv.ui.page import build_ui, serve_ui
    from glmv.ui.store import Store

    work = Path(tempfile.mkdtemp(prefix="glmv-shots-"))
    backend = ScriptedBackend(script, delay_s=0.002)
    backend.default_sampling = Settings().sampling
    manager = ModelManager(Settings(model="zai-org/GLM-4.6V-Flash"), lambda s, log: backend)
    manager.load_async()
    manager.wait(10)
    app = WebApp(manager, work / "html", store=Store(work / "state"), examples=INPUT)
    demo = build_ui(app)
    port = free_port()
    serve_ui(app, demo, port=port, block=False)
    url = f"http://127.0.0.1:{port}"
    OUT.mkdir(parents=True, exist_ok=True)

    def done(page, stats: str, timeout: float = 60000) -> None:
        page.wait_for_function(
            "(s) => { const e = document.querySelector(s + ' [data-testid=markdown]') || document.querySelector(s);"
            " return /[✓■✕]/.test(e.innerText); }", arg=f"#{stats}", timeout=timeout)
        page.wait_for_timeout(400)

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
            for name, (w, h) in VIEWPORTS.items():
                ctx = browser.new_context(viewport={"width": w, "height": h}, device_scale_factor=1)
                page = ctx.new_page()
                page.goto(url)
                page.wait_for_function("(document.querySelector('#glmv-status') || {innerText: ''}).innerText.includes('ready')")
                page.locator("#describe-image input[type=file]").first.set_input_files(str(INPUT / "image_1.png"))
                page.locator("#describe-mode").get_by_text("Find", exact=True).click()
                page.wait_for_function("document.querySelector('#describe-prompt').innerText.includes('What to find')")
                page.fill("#describe-prompt textarea", "the red house and the tree")
                page.click("#describe-run")
                done(page, "describe-stats")
                page.locator("#describe-found img").wait_for()
                page.screenshot(path=str(OUT / f"describe-find-{name}.png"), full_page=True)

                page.get_by_role("tab", name="OCR").click()
                page.locator("#ocr-image input[type=file]").first.set_input_files(str(INPUT / "image_2.png"))
                page.click("#ocr-run")
                done(page, "ocr-stats")
                page.screenshot(path=str(OUT / f"ocr-{name}.png"), full_page=True)

                page.get_by_role("tab", name="Image → HTML").click()
                page.locator("#html-image input[type=file]").first.set_input_files(str(INPUT / "image_3.png"))
                page.click("#html-run")
                done(page, "html-stats")
                page.fill("#html-rounds input[type=number]", "1")
                page.press("#html-rounds input[type=number]", "Enter")
                page.click("#html-refine")
                page.wait_for_function("document.querySelector('#html-stats').innerText.includes('✓ round')",
                                       timeout=120000)
                page.locator("#html-compare img").nth(1).wait_for()
                page.wait_for_timeout(600)
                page.screenshot(path=str(OUT / f"image-to-html-{name}.png"), full_page=True)

                page.get_by_role("tab", name="Chat").click()
                page.locator("#chat-box input[type=file]").set_input_files([str(INPUT / "image_1.png")])
                page.wait_for_timeout(400)
                page.locator("#chat-box textarea").fill("What is in this picture?")
                page.locator("#chat-box textarea").press("Enter")
                done(page, "chat-stats")
                page.screenshot(path=str(OUT / f"chat-{name}.png"), full_page=True)
                ctx.close()
            browser.close()
    finally:
        demo.close()
    for f in sorted(OUT.glob("*.png")):
        print(f.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())

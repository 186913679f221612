"""HTML rendering in headless Chromium (Debian's ``chromium`` through Playwright), with the network blocked.

A core module: the ``render_html`` tool (:mod:`glmv.tools`), the visual score (:mod:`glmv.score`) and the
refine loop (:func:`glmv.tasks.refine`) all render through it, so a metric never imports the tool registry.
"""

from __future__ import annotations

import shutil
from typing import Any

from .errors import GlmvError

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORTS = {"desktop": (1280, 800), "phone": (390, 844)}


def chromium_path() -> str:
    """The Chromium executable, or a clear error saying how to install it."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise GlmvError("rendering HTML needs Chromium: apt-get install chromium (and pip install playwright)")
    return path


def render_html(page: str, viewport: str = "desktop", full_page: bool = True, width: int | None = None) -> Any:
    """Screenshot of ``page`` in headless Chromium with every network request blocked. Returns a PIL image."""
    import io

    from PIL import Image

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise GlmvError("rendering HTML needs Playwright: pip install playwright") from None
    w, h = VIEWPORTS.get(viewport, VIEWPORTS["desktop"])
    if width:
        w = width
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": w, "height": h}, java_script_enabled=True,
                                          device_scale_factor=1)
            context.route("**/*", lambda route: route.abort())  # no network: the page sees only itself
            pg = context.new_page()
            pg.set_content(page, wait_until="load", timeout=15000)
            pg.wait_for_timeout(100)
            png = pg.screenshot(full_page=full_page, timeout=15000)
        finally:
            browser.close()
    return Image.open(io.BytesIO(png)).convert("RGB")

"""How close a page's render is to a target screenshot, as a person would judge it (after Design2Code).

The target is a picture, so its text lines and their boxes come from Tesseract OCR (of the image and of
its inverse, so a white title on a blue band is read too). The page is rendered in headless Chromium at the
target's width, and its text lines, boxes, text colours and background colours come from the DOM (text
nodes' word boxes and computed styles), not from OCR. Lines are matched by text (and nearness). Scores,
each in [0, 1]:

- ``block_match``: characters in matched lines over all characters of both pages (missing and extra text);
- ``text``: mean text similarity (difflib ratio) of matched lines;
- ``position``: mean of ``1 - max(|dx|, |dy|)`` of matched lines' centres, in fractions of the page size;
- ``colour``: per matched line, the text colour and the background behind it compared in CIEDE2000
  (``1 - ΔE00/50``, floored at 0), averaged;
- ``visual``: the whole page: half structure (SSIM in greyscale), half colour (mean CIELAB ΔE of the two
  pages shrunk to 64 px wide, ``1 - ΔE/50``);
- ``overall``: the mean of the five.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GlmvError

DE_SCALE = 50.0  # a colour difference of ΔE 50 (blue against red is ~55) counts as no match at all


@dataclass
class Word:
    text: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    colour: tuple[float, float, float] | None = None  # text colour, RGB 0-255 (known for the DOM side)
    background: tuple[float, float, float] | None = None


@dataclass
class Block:
    """A line of text: words next to each other at the same height."""

    text: str
    box: tuple[float, float, float, float]
    colour: tuple[float, float, float] | None = None
    background: tuple[float, float, float] | None = None


def lines(words: list[Word]) -> list[Block]:
    """Group words into lines the same way on both sides: rows of words at the same height, split where
    the gap between two words is wider than about one line height (a new column, a nav item)."""
    rows: list[list[Word]] = []
    for w in sorted(words, key=lambda w: (w.box[1] + w.box[3]) / 2):
        cy, h = (w.box[1] + w.box[3]) / 2, w.box[3] - w.box[1]
        for row in rows:
            rcy = sum((v.box[1] + v.box[3]) / 2 for v in row) / len(row)
            rh = max(v.box[3] - v.box[1] for v in row)
            if abs(cy - rcy) < 0.5 * max(h, rh):
                row.append(w)
                break
        else:
            rows.append([w])
    blocks = []
    for row in rows:
        row.sort(key=lambda w: w.box[0])
        height = float(np.median([w.box[3] - w.box[1] for w in row]))
        line = [row[0]]
        for w in row[1:] + [None]:  # type: ignore[list-item]
            if w is not None and w.box[0] - line[-1].box[2] < 1.2 * height:
                line.append(w)
                continue
            biggest = max(line, key=lambda v: len(v.text))
            blocks.append(Block(" ".join(v.text for v in line),
                                (min(v.box[0] for v in line), min(v.box[1] for v in line),
                                 max(v.box[2] for v in line), max(v.box[3] for v in line)),
                                biggest.colour, biggest.background))
            line = [w] if w is not None else []
    return blocks


# -- the target: OCR ------------------------------------------------------------------------------------
def _tesseract_words(image: Any) -> list[Word]:
    exe = shutil.which("tesseract")
    if exe is None:
        raise GlmvError("glmv score needs Tesseract OCR: apt-get install tesseract-ocr")
    with tempfile.TemporaryDirectory() as d:
        png = Path(d) / "in.png"
        image.save(png)
        # One thread: pages are small, and the scorer often runs beside a browser and a model.
        env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
        proc = subprocess.run([exe, str(png), "stdout", "--psm", "11", "tsv"], capture_output=True, text=True,
                              timeout=120, env=env)
    if proc.returncode != 0:
        raise GlmvError(f"tesseract failed: {proc.stderr.strip()[:200]}")
    words = []
    for row in proc.stdout.splitlines()[1:]:
        f = row.split("\t")
        if len(f) < 12 or not f[11].strip():
            continue
        try:
            if float(f[10]) < 40:
                continue
            x, y, w, h = int(f[6]), int(f[7]), int(f[8]), int(f[9])
        except ValueError:
            continue
        words.append(Word(f[11], (x, y, x + w, y + h)))
    return words


_OCR_CACHE: dict[str, list[Block]] = {}


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def ocr_blocks(image: Any) -> list[Block]:
    """Text lines of a screenshot: Tesseract on the image, plus the words only its inverse shows (light text
    on a dark band, which Tesseract misses in the original)."""
    from PIL import ImageOps

    key = hashlib.sha1(image.tobytes()).hexdigest() + f"{image.size}"
    if key in _OCR_CACHE:
        return _OCR_CACHE[key]
    grey = image.convert("L")
    words = _tesseract_words(grey)
    words += [w for w in _tesseract_words(ImageOps.invert(grey)) if not any(_overlaps(w.box, v.box) for v in words)]
    blocks = lines(words)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    for b in blocks:
        b.colour, b.background = _colours_in(rgb, b.box)
    if len(_OCR_CACHE) > 16:
        _OCR_CACHE.clear()
    _OCR_CACHE[key] = blocks
    return blocks


def _colours_in(rgb: np.ndarray, box: tuple[float, ...]) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(text colour, background colour) of a text box in a picture: the background is the box's most common
    colour, the text the median of the pixels farthest from it."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    region = rgb[max(0, y1):max(y1 + 1, y2), max(0, x1):max(x1 + 1, x2)].reshape(-1, 3)
    if len(region) == 0:
        return (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)
    background = np.median(region, axis=0)
    dist = np.linalg.norm(region - background, axis=1)
    far = region[dist >= max(np.quantile(dist, 0.9), 1e-6)]
    text = np.median(far, axis=0) if len(far) else background
    return tuple(float(v) for v in text), tuple(float(v) for v in background)  # type: ignore[return-value]


# -- the page: the DOM ----------------------------------------------------------------------------------
DOM_WORDS_JS = """
() => {
  const words = [];
  const transparent = (c) => !c || c === 'transparent' || /rgba\\(.*,\\s*0\\)$/.test(c);
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  let node;
  while ((node = walker.nextNode())) {
    const el = node.parentElement;
    if (!el || ['SCRIPT', 'STYLE', 'NOSCRIPT', 'TEMPLATE'].includes(el.tagName)) continue;
    const style = getComputedStyle(el);
    if (style.visibility === 'hidden' || Number(style.opacity) === 0) continue;
    let bg = 'rgb(255, 255, 255)';
    for (let e = el; e; e = e.parentElement) {
      const b = getComputedStyle(e).backgroundColor;
      if (!transparent(b)) { bg = b; break; }
    }
    const re = /\\S+/g;
    let m;
    while ((m = re.exec(node.textContent))) {
      const range = document.createRange();
      range.setStart(node, m.index);
      range.setEnd(node, m.index + m[0].length);
      const r = range.getBoundingClientRect();
      if (r.width < 1 || r.height < 1) continue;
      words.push({text: m[0], box: [r.left + scrollX, r.top + scrollY, r.right + scrollX, r.bottom + scrollY],
                  color: style.color, bg});
    }
  }
  return words;
}
"""


def _rgb(css: str) -> tuple[float, float, float]:
    nums = [float(v) for v in css[css.find("(") + 1 : css.find(")")].replace("/", ",").replace(" ", ",").split(",") if v]
    return (nums + [0.0, 0.0, 0.0])[0], (nums + [0.0, 0.0, 0.0])[1], (nums + [0.0, 0.0, 0.0])[2]


class PageRenderer:
    """One headless Chromium (network blocked) for many renders; use as a context manager."""

    def __enter__(self) -> "PageRenderer":
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            raise GlmvError("glmv score needs Playwright: pip install playwright") from None
        from .render import CHROMIUM_ARGS, chromium_path

        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        self._context = self._browser.new_context(device_scale_factor=1)
        self._context.route("**/*", lambda route: route.abort())  # the page sees only itself
        self._page = self._context.new_page()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._browser.close()
        self._pw.stop()

    def render(self, html: str, width: int, height: int) -> tuple[Any, list[Block]]:
        """The page at ``width`` x ``height`` (cut or padded white), and its text lines from the DOM."""
        import io

        from PIL import Image

        page = self._page
        page.set_viewport_size({"width": width, "height": height})
        page.set_content(html, wait_until="load", timeout=15000)
        page.wait_for_timeout(50)
        words = page.evaluate(DOM_WORDS_JS)
        png = page.screenshot(clip={"x": 0, "y": 0, "width": width, "height": height}, timeout=15000)
        render = Image.open(io.BytesIO(png)).convert("RGB")
        if render.size != (width, height):
            canvas = Image.new("RGB", (width, height), "white")
            canvas.paste(render, (0, 0))
            render = canvas
        inside = [Word(w["text"], tuple(w["box"]), _rgb(w["color"]), _rgb(w["bg"])) for w in words
                  if w["box"][1] < height and w["box"][0] < width]
        return render, lines(inside)  # type: ignore[arg-type]


# -- comparing ------------------------------------------------------------------------------------------
def _lab(rgb: np.ndarray) -> np.ndarray:
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def delta_e2000(rgb1: Any, rgb2: Any) -> float:
    """CIEDE2000 colour difference of two sRGB colours (0-255)."""
    L1, a1, b1 = _lab(np.array(rgb1))
    L2, a2, b2 = _lab(np.array(rgb2))
    c1, c2 = np.hypot(a1, b1), np.hypot(a2, b2)
    cm = (c1 + c2) / 2
    g = 0.5 * (1 - np.sqrt(cm**7 / (cm**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p, h2p = np.degrees(np.arctan2(b1, a1p)) % 360, np.degrees(np.arctan2(b2, a2p)) % 360
    dL, dC = L2 - L1, c2p - c1p
    dh = h2p - h1p
    if c1p * c2p == 0:
        dh = 0.0
    elif dh > 180:
        dh -= 360
    elif dh < -180:
        dh += 360
    dH = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    Lm, cpm = (L1 + L2) / 2, (c1p + c2p) / 2
    hs = h1p + h2p
    if c1p * c2p == 0:
        hm = hs
    elif abs(h1p - h2p) <= 180:
        hm = hs / 2
    else:
        hm = (hs + 360) / 2 if hs < 360 else (hs - 360) / 2
    t = (1 - 0.17 * np.cos(np.radians(hm - 30)) + 0.24 * np.cos(np.radians(2 * hm))
         + 0.32 * np.cos(np.radians(3 * hm + 6)) - 0.20 * np.cos(np.radians(4 * hm - 63)))
    sl = 1 + 0.015 * (Lm - 50) ** 2 / np.sqrt(20 + (Lm - 50) ** 2)
    sc, sh = 1 + 0.045 * cpm, 1 + 0.015 * cpm * t
    rt = -2 * np.sqrt(cpm**7 / (cpm**7 + 25.0**7)) * np.sin(np.radians(60 * np.exp(-(((hm - 275) / 25) ** 2))))
    return float(np.sqrt((dL / sl) ** 2 + (dC / sc) ** 2 + (dH / sh) ** 2 + rt * (dC / sc) * (dH / sh)))


def _colour_similarity(a: Any, b: Any) -> float:
    return max(0.0, 1.0 - delta_e2000(a, b) / DE_SCALE)


def ssim(a: Any, b: Any, width: int = 256) -> float:
    """Mean SSIM of two images in greyscale, both resized to ``width`` x (the target's aspect)."""
    h = max(8, int(round(width * a.height / a.width)))
    x = np.asarray(a.convert("L").resize((width, h)), dtype=np.float64)
    y = np.asarray(b.convert("L").resize((width, h)), dtype=np.float64)
    win = 7
    from numpy.lib.stride_tricks import sliding_window_view as windows

    xw, yw = windows(x, (win, win)), windows(y, (win, win))
    mx, my = xw.mean((-1, -2)), yw.mean((-1, -2))
    vx, vy = xw.var((-1, -2)), yw.var((-1, -2))
    cov = (xw * yw).mean((-1, -2)) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(np.clip(s.mean(), 0.0, 1.0))


def colour_layout(a: Any, b: Any, width: int = 64) -> float:
    """How alike the two pages' colours are, place by place: 1 - mean CIELAB ΔE of 64-px-wide thumbnails / 50."""
    from PIL import Image

    h = max(4, int(round(width * a.height / a.width)))
    x = _lab(np.asarray(a.convert("RGB").resize((width, h), Image.Resampling.BOX)))
    y = _lab(np.asarray(b.convert("RGB").resize((width, h), Image.Resampling.BOX)))
    return max(0.0, 1.0 - float(np.linalg.norm(x - y, axis=-1).mean()) / DE_SCALE)


def _match(tb: list[Block], rb: list[Block], tsize: tuple[int, int], rsize: tuple[int, int]) -> list[tuple[float, Block, Block]]:
    """Greedy one-to-one matching by text similarity (>= 0.5), nearer pairs first among equals."""
    pairs = []
    for i, t in enumerate(tb):
        for j, r in enumerate(rb):
            ratio = difflib.SequenceMatcher(None, t.text.lower(), r.text.lower()).ratio()
            if ratio >= 0.5:
                pairs.append((ratio - 0.1 * _distance(t, r, tsize, rsize), ratio, i, j))
    pairs.sort(reverse=True)
    used_t, used_r, matched = set(), set(), []
    for _, ratio, i, j in pairs:
        if i not in used_t and j not in used_r:
            used_t.add(i), used_r.add(j)
            matched.append((ratio, tb[i], rb[j]))
    return matched


def _distance(t: Block, r: Block, tsize: tuple[int, int], rsize: tuple[int, int]) -> float:
    tc = ((t.box[0] + t.box[2]) / 2 / tsize[0], (t.box[1] + t.box[3]) / 2 / tsize[1])
    rc = ((r.box[0] + r.box[2]) / 2 / rsize[0], (r.box[1] + r.box[3]) / 2 / rsize[1])
    return min(1.0, max(abs(tc[0] - rc[0]), abs(tc[1] - rc[1])))


def score_blocks(target: Any, tb: list[Block], render: Any, rb: list[Block]) -> dict[str, Any]:
    """The scores of a render (with its text lines) against the target (with its text lines)."""
    matched = _match(tb, rb, target.size, render.size)
    total = sum(len(b.text) for b in tb) + sum(len(b.text) for b in rb)
    matched_chars = sum(len(t.text) + len(r.text) for _, t, r in matched)
    block_match = matched_chars / total if total else 1.0
    if matched:
        text = float(np.mean([m[0] for m in matched]))
        position = float(np.mean([1 - _distance(t, r, target.size, render.size) for _, t, r in matched]))
        colour = float(np.mean([(_colour_similarity(t.colour, r.colour) + _colour_similarity(t.background, r.background)) / 2
                                for _, t, r in matched]))
    else:
        text = position = colour = 0.0 if total else 1.0
    visual = (ssim(target, render) + colour_layout(target, render)) / 2
    scores = {"block_match": block_match, "text": text, "position": position, "colour": colour, "visual": visual}
    scores = {k: round(v, 4) for k, v in scores.items()}
    scores["overall"] = round(float(np.mean(list(scores.values()))), 4)
    return {**scores, "target_blocks": len(tb), "render_blocks": len(rb), "matched_blocks": len(matched),
            "matches": [{"target": t.text, "render": r.text, "similarity": round(q, 3)} for q, t, r in matched[:50]]}


def load_target(target: Path | Any) -> Any:
    from .media import load_image

    return target if hasattr(target, "size") else load_image(target, max_pixels=64_000_000).image


def score_page(target: Path | Any, html: str, renderer: PageRenderer | None = None) -> tuple[dict[str, Any], Any]:
    """Render ``html`` at the target's size and score it; returns (report, the render).

    Pass a ``renderer`` (an open :class:`PageRenderer`) to score many pages with one browser."""
    target = load_target(target)
    if renderer is None:
        with PageRenderer() as own:
            render, rb = own.render(html, target.width, target.height)
    else:
        render, rb = renderer.render(html, target.width, target.height)
    return score_blocks(target, ocr_blocks(target), render, rb), render

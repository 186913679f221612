"""Visual similarity between a target screenshot and a page's render, in the spirit of Design2Code.

Both images are read by Tesseract OCR into text lines with boxes ("blocks"); the page is rendered in
headless Chromium at the target's width. Blocks are matched greedily by text similarity. The scores, each
in [0, 1]:

- ``block_match``: how much of both pages' text falls in matched blocks (characters of matched blocks over
  all characters, target and render together): missing and extra text both lower it;
- ``text``: mean text similarity (difflib ratio) of matched blocks;
- ``position``: mean of ``1 - max(|dx|, |dy|)`` of matched blocks' centres, in fractions of each image's size;
- ``colour``: mean of ``1 - ΔE/100`` between matched blocks' text colours (CIE76 in Lab);
- ``visual``: structural similarity (SSIM) of the two images in greyscale at a common size;
- ``overall``: the mean of the five.
"""

from __future__ import annotations

import difflib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GlmvError


@dataclass
class Block:
    text: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels


def ocr_blocks(image: Any) -> list[Block]:
    """Text lines with boxes, from Tesseract's TSV output."""
    exe = shutil.which("tesseract")
    if exe is None:
        raise GlmvError("glmv score needs Tesseract OCR: apt-get install tesseract-ocr")
    with tempfile.TemporaryDirectory() as d:
        png = Path(d) / "in.png"
        image.save(png)
        proc = subprocess.run([exe, str(png), "stdout", "--psm", "11", "tsv"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise GlmvError(f"tesseract failed: {proc.stderr.strip()[:200]}")
    lines: dict[tuple[int, int, int], list[tuple[str, int, int, int, int]]] = {}
    for row in proc.stdout.splitlines()[1:]:
        f = row.split("\t")
        if len(f) < 12 or not f[11].strip():
            continue
        try:
            if float(f[10]) < 30:
                continue
            key = (int(f[2]), int(f[3]), int(f[4]))
            x, y, w, h = int(f[6]), int(f[7]), int(f[8]), int(f[9])
        except ValueError:
            continue
        lines.setdefault(key, []).append((f[11], x, y, x + w, y + h))
    out = []
    for words in lines.values():
        text = " ".join(w[0] for w in words)
        box = (min(w[1] for w in words), min(w[2] for w in words), max(w[3] for w in words), max(w[4] for w in words))
        out.append(Block(text, box))
    return out


def _lab(rgb: np.ndarray) -> np.ndarray:
    c = rgb / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def text_colour(image: Any, box: tuple[int, int, int, int]) -> np.ndarray:
    """The colour of the text in a box: the median of the pixels farthest from the box's background."""
    region = np.asarray(image.crop(box).convert("RGB"), dtype=np.float64).reshape(-1, 3)
    if len(region) == 0:
        return np.zeros(3)
    background = np.median(region, axis=0)
    dist = np.linalg.norm(region - background, axis=1)
    far = region[dist >= np.quantile(dist, 0.8)]
    return np.median(far, axis=0)


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


def score_images(target: Any, render: Any) -> dict[str, Any]:
    tb, rb = ocr_blocks(target), ocr_blocks(render)
    pairs = []
    for i, t in enumerate(tb):
        for j, r in enumerate(rb):
            ratio = difflib.SequenceMatcher(None, t.text.lower(), r.text.lower()).ratio()
            if ratio >= 0.5:
                pairs.append((ratio, i, j))
    pairs.sort(reverse=True)
    used_t, used_r, matched = set(), set(), []
    for ratio, i, j in pairs:
        if i not in used_t and j not in used_r:
            used_t.add(i), used_r.add(j)
            matched.append((ratio, tb[i], rb[j]))
    total = sum(len(b.text) for b in tb) + sum(len(b.text) for b in rb)
    matched_chars = sum(len(t.text) + len(r.text) for _, t, r in matched)
    block_match = matched_chars / total if total else 1.0
    if matched:
        text = float(np.mean([m[0] for m in matched]))
        pos = []
        col = []
        for _, t, r in matched:
            tc = ((t.box[0] + t.box[2]) / 2 / target.width, (t.box[1] + t.box[3]) / 2 / target.height)
            rc = ((r.box[0] + r.box[2]) / 2 / render.width, (r.box[1] + r.box[3]) / 2 / render.height)
            pos.append(1 - min(1.0, max(abs(tc[0] - rc[0]), abs(tc[1] - rc[1]))))
            de = float(np.linalg.norm(_lab(text_colour(target, t.box)) - _lab(text_colour(render, r.box))))
            col.append(max(0.0, 1 - de / 100))
        position, colour = float(np.mean(pos)), float(np.mean(col))
    else:
        text = position = colour = 0.0 if total else 1.0
    visual = ssim(target, render)
    scores = {"block_match": block_match, "text": text, "position": position, "colour": colour, "visual": visual}
    scores = {k: round(v, 4) for k, v in scores.items()}
    scores["overall"] = round(float(np.mean(list(scores.values()))), 4)
    return {**scores, "target_blocks": len(tb), "render_blocks": len(rb), "matched_blocks": len(matched),
            "matches": [{"target": t.text, "render": r.text, "similarity": round(q, 3)} for q, t, r in matched[:50]]}


def render_like(html: str, target: Any) -> Any:
    """The page rendered at the target's width, cut or padded (white) to the target's height."""
    from PIL import Image

    from .tools import render_html

    render = render_html(html, width=target.width)
    render = render.crop((0, 0, render.width, min(render.height, max(target.height, 1))))
    if render.height < target.height:
        canvas = Image.new("RGB", (render.width, target.height), "white")
        canvas.paste(render, (0, 0))
        render = canvas
    return render


def load_target(target: Path | Any) -> Any:
    from .media import load_image

    return target if hasattr(target, "size") else load_image(target, max_pixels=64_000_000).image


def score_page(target: Path | Any, html: str) -> tuple[dict[str, Any], Any]:
    """Render ``html`` like the target and score it; returns (report, the render)."""
    target = load_target(target)
    render = render_like(html, target)
    return score_images(target, render), render

"""Grounding: find things in an image and draw where they are.

GLM-4.6V answers "where is X" with boxes ``[[x1,y1,x2,y2]]`` on a 0–1000 scale of the image's width and
height, usually inside ``<|begin_of_box|>…<|end_of_box|>``. This module owns the prompt that asks for them,
the labelled boxes of an answer (:func:`find_boxes`, over the parser's ``extract_boxes``), their conversion
to pixels and the annotated image (:func:`draw_boxes`). The flow from an answer to what the user gets
(boxes, annotated image, JSON, the status note, the files written) is :func:`annotate` and
:meth:`Annotation.save`, once: the CLI's ``glmv ground`` and the web app's Find mode (and Chat's Find) call
them and only show what comes back.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .media import LoadedImage

SCALE = 1000  # GLM's box coordinates are per mille of the image's width and height

FIND_PROMPT = (
    "Find {query} in the image. For each one you find, write a short label followed by its bounding box "
    "as [[x1,y1,x2,y2]], with coordinates from 0 to 1000 relative to the image's width and height."
)

# Colours that stay readable on photos and screenshots; labels are drawn in white on the box colour.
PALETTE = [(230, 25, 75), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180), (0, 128, 128),
           (240, 50, 230), (128, 0, 0)]


@dataclass
class Box:
    """One found object: its label and its box on GLM's 0–1000 scale."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The box in pixels of a ``width`` x ``height`` image, clamped to it and ordered (x1 <= x2)."""
        xs = sorted(min(max(v, 0.0), SCALE) * width / SCALE for v in (self.x1, self.x2))
        ys = sorted(min(max(v, 0.0), SCALE) * height / SCALE for v in (self.y1, self.y2))
        return round(xs[0]), round(ys[0]), round(xs[1]), round(ys[1])


def find_prompt(query: str) -> str:
    return FIND_PROMPT.format(query=query.strip())


def find_boxes(answer: str, fallback_label: str = "") -> list[Box]:
    """The answer's boxes (found by the core's parser: any bracket style, JSON objects, labels written next
    to them); a box without a label gets ``fallback_label`` (what was asked for). Boxes less than one unit
    wide or high are dropped: there is nothing to draw, and such a box is almost always a model writing
    0–1 fractions instead of the 0–1000 scale (``[[0.1,0.2,0.5,0.6]]`` would be a dot in the corner)."""
    from .parsing import extract_boxes

    boxes = [b for b in extract_boxes(answer or "")
             if abs(b.coords[2] - b.coords[0]) >= 1 and abs(b.coords[3] - b.coords[1]) >= 1]
    return [Box(b.label or fallback_label or f"box {i + 1}", *b.coords) for i, b in enumerate(boxes)]


def no_boxes_note(answer: str) -> str:
    """Why nothing was drawn, for the status line: no boxes at all, or boxes this app cannot place."""
    if re.search(r"\[\s*-?\d", answer or ""):
        return "no usable boxes in the answer (boxes must be [[x1,y1,x2,y2]] from 0 to 1000)"
    return "no boxes in the answer"


def draw_boxes(image: Any, boxes: list[Box]) -> Any:
    """A copy of the PIL ``image`` with each box outlined and labelled."""
    from PIL import ImageDraw, ImageFont

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 200))
    try:
        font = ImageFont.load_default(size=max(12, round(min(out.size) / 40)))
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        font = ImageFont.load_default()
    for i, box in enumerate(boxes):
        colour = PALETTE[i % len(PALETTE)]
        x1, y1, x2, y2 = box.pixels(*out.size)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        if box.label:
            l, t, r, b = draw.textbbox((0, 0), box.label, font=font)
            tw, th = r - l + 6, b - t + 4
            ty = y1 - th if y1 - th >= 0 else min(y2, out.height - th)  # above the box, else inside its bottom
            draw.rectangle((x1, ty, x1 + tw, ty + th), fill=colour)
            draw.text((x1 + 3 - l, ty + 2 - t), box.label, fill="white", font=font)
    return out


def boxes_report(boxes: list[Box], width: int, height: int) -> dict[str, Any]:
    """The boxes as data: label, the 0–1000 box the model gave, and the box in pixels of the ``width`` x
    ``height`` image (the input file's size: see :func:`annotate`)."""
    return {"image_size": [width, height], "boxes": [
        {"label": b.label, "box_1000": [b.x1, b.y1, b.x2, b.y2], "box_px": list(b.pixels(width, height))}
        for b in boxes]}


def boxes_json(boxes: list[Box], width: int, height: int) -> str:
    return json.dumps(boxes_report(boxes, width, height), indent=2, ensure_ascii=False)


@dataclass
class Annotation:
    """What one grounding answer gives: its boxes, the image with them drawn (None without boxes) and the note
    for the status line ("2 boxes drawn", or why nothing was)."""

    boxes: list[Box]
    size: tuple[int, int]
    annotated: Any | None  # PIL.Image.Image
    note: str

    def report(self) -> dict[str, Any]:
        return boxes_report(self.boxes, *self.size)

    def save(self, png: Path, json_path: Path | None = None) -> list[Path]:
        """Write the annotated PNG (and the boxes' JSON), each atomically; the paths written (none without
        boxes)."""
        from .outputs import write_atomic

        if self.annotated is None:
            return []
        buf = io.BytesIO()
        self.annotated.save(buf, format="PNG")
        written = [write_atomic(Path(png), buf.getvalue())]
        if json_path is not None:
            text = json.dumps(self.report(), indent=2, ensure_ascii=False) + "\n"
            written.append(write_atomic(Path(json_path), text))
        return written


def annotate(image: Any, answer: str, label: str) -> Annotation:
    """The boxes of ``answer`` (unlabelled ones named ``label``, what was asked for) drawn on ``image``, a PIL
    image or a :class:`~glmv.media.LoadedImage`. One rule for every output: pixels are the input file's own
    pixels (as ``glmv ask --json`` gives them), so a LoadedImage that was scaled down for the model is drawn on
    at its original size and its boxes are reported in that size; the 0–1000 boxes are the model's, unchanged."""
    loaded = isinstance(image, LoadedImage)
    size = tuple(image.original_size) if loaded else image.size
    boxes = find_boxes(answer, label)
    if not boxes:
        return Annotation([], size, None, no_boxes_note(answer))
    note = f"{len(boxes)} box{'es' if len(boxes) > 1 else ''} drawn"
    return Annotation(boxes, size, draw_boxes(image.full_image() if loaded else image, boxes), note)


__all__ = ["Annotation", "Box", "FIND_PROMPT", "annotate", "boxes_json", "boxes_report", "draw_boxes", "find_boxes",
           "find_prompt", "no_boxes_note"]

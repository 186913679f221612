"""The visual feedback loop for screenshot-to-HTML: render, compare with the target, correct, repeat.

Each round renders the current page in Chromium at the target's width, shows the model the render beside
the target screenshot together with its code, and asks for a corrected page. Every version is saved and
scored (:mod:`glmv.score`); the loop stops early when the score stops improving or the answer has no HTML.
With ``cancel`` set the round in progress ends at once; with ``progress=True`` the loop also yields
``{"progress": True, "round": r, "phase": "writing" | "scoring", "tokens": n}`` as it goes, so a front end
can show it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Generator, Iterator

from .backends.base import Backend, Chunk, GenerationRequest, Result, collect
from .media import LoadedImage
from .outputs import save_html
from .prompts import user_message
from .settings import SamplingParams

REFINE_PROMPT = (
    "The first image is the target screenshot. The second image is how your HTML below renders.\n"
    "```html\n{html}\n```\n"
    "Compare them carefully (layout, sizes, colours, text) and output the corrected complete page as one "
    "```html block."
)


def refine(backend: Backend, target: LoadedImage, first_html: str, first_path: Path, rounds: int,
           sampling: SamplingParams, thinking: bool, out_dir: Path, cancel: threading.Event | None = None,
           progress: bool = False) -> Iterator[dict[str, Any]]:
    """Yield one dict per version: version, path, html, score, report, render (PIL), and 'stop' on the last
    (plus progress dicts when ``progress`` is true)."""
    from .score import score_page

    html = first_html
    if progress:
        yield {"progress": True, "round": 1, "phase": "scoring", "tokens": 0}
    report, render = score_page(target.image, html)
    version = {"version": 1, "path": str(first_path), "html": html, "score": report["overall"], "report": report,
               "render": render}
    best = report["overall"]
    for r in range(2, rounds + 2):
        request = GenerationRequest(
            [user_message(REFINE_PROMPT.format(html=html), [target, LoadedImage(render, "render", render.size)])],
            sampling=sampling, thinking=thinking, speculate=True)  # the new page mostly copies the old one
        result = yield from _watch(backend.generate(request, cancel), r, progress)
        if result.finish_reason == "cancelled":
            version["stop"] = "stopped"
            yield version
            return
        if result.output.html is None:
            version["stop"] = "the answer had no HTML; stopping"
            yield version
            return
        yield version
        html = result.output.html
        if progress:
            yield {"progress": True, "round": r, "phase": "scoring", "tokens": result.usage.completion_tokens}
        report, render = score_page(target.image, html)
        version = {"version": r, "path": str(save_html(html, out_dir)), "html": html, "score": report["overall"],
                   "report": report, "render": render}
        if report["overall"] <= best:
            version["stop"] = "the score stopped improving; stopping"
            yield version
            return
        best = report["overall"]
    yield version


def _watch(chunks: Iterator[Chunk], round_: int, report: bool) -> Generator[dict[str, Any], None, Result]:
    """Collect one round's answer, yielding its token count now and then when ``report`` is true."""
    last = 0.0
    for chunk in chunks:
        if chunk.type == "done":
            return collect(iter([chunk]))
        now = time.perf_counter()
        if report and now - last > 0.1:
            last = now
            yield {"progress": True, "round": round_, "phase": "writing", "tokens": chunk.usage.completion_tokens}
    return collect(iter([]))  # raises: the stream ended without a result

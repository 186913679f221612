"""Work budgets: how much one request (server) or one command (CLI) may ask for, checked before the work.

A 4 MB request can hold 200 PNGs that decode to 800 million pixels; a 0.14 MB PDF can hold 100 pages; a
text body can be 50 MB. Each would cost minutes and gigabytes before the model's context check refused it.
So every front end fills one :class:`Budget` from what is known *before* decoding: the number of images
and pages, their sizes from image headers and PDF page boxes, a video's sampled frame count from its
container header, and the number of text characters. Each ``add_*`` call raises :class:`LimitError` (or
:class:`~glmv.errors.ContextLengthError` for the prompt-token estimate) the moment a limit is passed,
naming the limit and the flag that raises it. The limits themselves are one typed :class:`Limits`, with
defaults sized to the model's 128K context, declared once here for the CLI and ``glmv serve`` flags.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import ContextLengthError, LimitError, RequestError

DEFAULT_CONTEXT_TOKENS = 131072  # GLM-4.6V and -Flash (128K); the backend's own figure wins when known
PATCH = 28  # the processor's patch (14) times its spatial merge (2): one visual token per 28x28 block
VIDEO_MAX_PIXELS = 47_040_000  # the video processor's pixel budget over all frames of one video
CHARS_PER_TOKEN = 5  # deliberately high (English averages ~4): the estimate errs low, never refusing a prompt that fits


@dataclass(frozen=True)
class Limits:
    """What one request or command may ask for. Defaults fit the 128K context with room to spare."""

    max_images: int = 64  # images plus PDF pages, across the request
    max_pdf_pages: int = 64  # PDF pages rendered, across the request
    max_total_pixels: int = 100_000_000  # pixels decoded or rendered (image headers' sizes), across the request
    max_video_frames: int = 600  # frames sampled (2 per second), across the request's videos
    max_text_chars: int = 1_000_000  # characters of text in the messages
    max_prompt_tokens: int | None = None  # estimated prompt tokens; None: the model's context

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "max_prompt_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RequestError(f"invalid --{f.name.replace('_', '-')} {value!r}: must be an integer >= 1")

    def merged(self, **overrides: Any) -> "Limits":
        """A copy with the non-None overrides applied (and validated)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


# One flag per limit, shared by every command that takes media and by ``glmv serve``.
_FLAG_HELP = {
    "max_images": "images plus PDF pages per request",
    "max_pdf_pages": "PDF pages rendered per request",
    "max_total_pixels": "pixels decoded or rendered per request, from image headers and page sizes",
    "max_video_frames": "video frames sampled per request (2 a second)",
    "max_text_chars": "characters of text per request",
    "max_prompt_tokens": "estimated prompt tokens per request (default: the model's context)",
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The limit flags (``--max-images`` ...), all defaulting to :class:`Limits`' values."""
    g = parser.add_argument_group("limits (refused before any work; see README 'Limits and guarantees')")
    defaults = Limits()
    for f in fields(Limits):
        default = getattr(defaults, f.name)
        shown = f" (default {default:,})" if default is not None else ""
        g.add_argument(flag(f.name), dest=f.name, type=int, default=None, metavar="N", help=_FLAG_HELP[f.name] + shown)


def limits_from_args(args: argparse.Namespace) -> Limits:
    return Limits().merged(**{f.name: getattr(args, f.name, None) for f in fields(Limits)})


def image_tokens(width: int, height: int) -> int:
    """Visual tokens of an image the processor receives at ``width`` x ``height`` (sides rounded to 28)."""
    return max(1, round(height / PATCH)) * max(1, round(width / PATCH))


def video_tokens(frames: int, width: int, height: int) -> int:
    """Visual tokens of ``frames`` frames of ``width`` x ``height``: frames pair in time, and the processor
    shrinks frames so that one video holds at most :data:`VIDEO_MAX_PIXELS` pixels."""
    pixels = min(frames * width * height, VIDEO_MAX_PIXELS)
    return pixels // (PATCH * PATCH * 2) + frames * 8  # + each frame's timestamp text and markers


class Budget:
    """The work one request has asked for so far; every ``add_*`` checks the limits before the work."""

    def __init__(self, limits: Limits | None = None, context_tokens: int | None = None, *,
                 separate_prompts: bool = False) -> None:
        self.limits = limits or Limits()
        self.context_tokens = self.limits.max_prompt_tokens or context_tokens or DEFAULT_CONTEXT_TOKENS
        # OCR of many pages sends one prompt per page: tokens are then checked per item, not summed.
        self.separate_prompts = separate_prompts
        self.images = self.pages = self.frames = self.pixels = self.chars = 0
        self.text_tokens = self.visual_tokens = self.largest_item_tokens = 0

    # -- what is counted ---------------------------------------------------------------------------
    def add_text(self, text_or_chars: str | int) -> None:
        n = text_or_chars if isinstance(text_or_chars, int) else len(text_or_chars)
        self.chars += n
        self._over("max_text_chars", self.chars, "characters of text", "send less text")
        self.text_tokens = self.chars // CHARS_PER_TOKEN
        self._check_tokens()

    def count_images(self, n: int) -> None:
        """A quick check from the number of image parts alone, before any of them is read."""
        self._over("max_images", self.images + n, "images", "send fewer images")

    def add_image(self, name: str, decoded: tuple[int, int], model: tuple[int, int]) -> None:
        """One image whose header says ``decoded`` (w, h), shown to the model at ``model`` (w, h)."""
        self.images += 1
        self._over("max_images", self.images, "images", "send fewer images")
        self._add_pixels(name, decoded[0] * decoded[1])
        self._add_visual(image_tokens(*model))

    def add_pages(self, name: str, rendered: list[tuple[int, int]], model: list[tuple[int, int]]) -> None:
        """PDF pages that would render at ``rendered`` sizes and reach the model at ``model`` sizes."""
        self.pages += len(rendered)
        self._over("max_pdf_pages", self.pages, "PDF pages", f"select fewer pages of '{name}' with --pages")
        self.images += len(rendered)
        self._over("max_images", self.images, "images and PDF pages", f"select fewer pages of '{name}' with --pages")
        self._add_pixels(name, sum(w * h for w, h in rendered))
        for size in model:
            self._add_visual(image_tokens(*size))

    def add_video(self, name: str, frames: int, model: tuple[int, int]) -> None:
        """A video that will be sampled to ``frames`` frames of ``model`` (w, h)."""
        self.frames += frames
        self._over("max_video_frames", self.frames, "video frames (2 a second)", f"use a shorter clip than '{name}'")
        self._add_pixels(name, frames * model[0] * model[1])
        self._add_visual(video_tokens(frames, *model))

    # -- checks ------------------------------------------------------------------------------------
    @property
    def estimated_tokens(self) -> int:
        if self.separate_prompts:
            return self.text_tokens + self.largest_item_tokens
        return self.text_tokens + self.visual_tokens

    def _add_pixels(self, name: str, n: int) -> None:
        self.pixels += n
        self._over("max_total_pixels", self.pixels, "pixels to decode",
                   f"send smaller images, fewer pages, or a lower --dpi/--pdf-long-side (at '{name}')")

    def _add_visual(self, tokens: int) -> None:
        self.visual_tokens += tokens
        self.largest_item_tokens = max(self.largest_item_tokens, tokens)
        self._check_tokens()

    def _check_tokens(self) -> None:
        estimate = self.estimated_tokens
        if estimate >= self.context_tokens:
            raise ContextLengthError(
                f"the prompt would be about {estimate:,} tokens (text plus images, estimated before decoding) but the "
                f"limit is {self.context_tokens:,} (the model's context, or {flag('max_prompt_tokens')}): use fewer "
                f"images or pages (--pages), a lower resolution (--max-pixels, --pdf-long-side), a shorter video, "
                f"or a shorter prompt"
            )

    def _over(self, name: str, value: int, what: str, advice: str) -> None:
        limit = getattr(self.limits, name)
        if value > limit:
            raise LimitError(f"too much work in one request: {value:,} {what}, over the limit of {limit:,} "
                             f"({name}): {advice}, or raise the limit with {flag(name)}", limit=name)


__all__ = ["Limits", "Budget", "DEFAULT_CONTEXT_TOKENS", "add_limit_arguments", "limits_from_args", "image_tokens",
           "video_tokens", "flag"]

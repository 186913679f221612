"""Task presets and conversation building.

A conversation is a list of :class:`Message` objects whose content interleaves text and images. This
module knows the default prompts of the three tutorial jobs (describe, OCR, image to HTML) and of the refine
loop, validates
a conversation before any model work, and turns it into the message format chat templates expect
(``{"type": "image"}`` placeholders plus the images in order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .errors import RequestError
from .media import LoadedImage
from .parsing import ToolCall

Role = Literal["system", "user", "assistant", "tool"]
Content = Union[str, LoadedImage, Any]  # text, an image, or a documents.LoadedVideo


@dataclass(frozen=True)
class Task:
    name: str
    prompt: str
    help: str


TASKS: dict[str, Task] = {
    "describe": Task("describe", "describe this image", "describe an image"),
    "ocr": Task(
        "ocr",
        "Extract all the text in this image, in natural reading order. Keep headings, paragraphs and "
        "lists; render every table as a Markdown table. Output only the extracted text, with no "
        "commentary, explanation or description of the image.",
        "read the text in an image (OCR) as Markdown",
    ),
    "html": Task(
        "html",
        "Recreate this screenshot as one complete, self-contained HTML file: semantic HTML with all CSS "
        "in a <style> tag, no external resources, matching the layout, colours, fonts and text as "
        "closely as possible. Output only the code, in a single ```html block.",
        "turn a screenshot into a self-contained HTML page",
    ),
}

# The refine loop's question (:func:`glmv.tasks.refine`): the target first, then the render of the code below.
REFINE_PROMPT = (
    "The first image is the target screenshot. The second image is how your HTML below renders.\n"
    "```html\n{html}\n```\n"
    "Compare them carefully (layout, sizes, colours, text) and output the corrected complete page as one "
    "```html block."
)


@dataclass
class Message:
    """One turn. ``content`` mixes text and images in order."""

    role: Role
    content: list[Content] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    # An assistant turn's reasoning. The chat template keeps it only for turns after the last user message
    # (the tool loop: the model continues its own chain of thought) and drops it from earlier history.
    reasoning: str = ""

    @property
    def text(self) -> str:
        return "".join(c for c in self.content if isinstance(c, str))

    @property
    def images(self) -> list[LoadedImage]:
        return [c for c in self.content if isinstance(c, LoadedImage)]

    @property
    def videos(self) -> list[Any]:
        return [c for c in self.content if _is_video(c)]


def _is_video(c: Any) -> bool:
    return hasattr(c, "frames") and hasattr(c, "metadata")


def user_message(prompt: str, media: list[Any] | None = None) -> Message:
    """A user turn with the images (or videos, or PDF pages) first, then the prompt (GLM's usual order)."""
    return Message("user", [*(media or []), prompt])


def validate_messages(messages: list[Message]) -> None:
    """Refuse conversations the model cannot answer, before touching it."""
    if not messages:
        raise RequestError("the conversation is empty: give a prompt")
    for i, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant", "tool"):
            raise RequestError(f"message {i}: unknown role {m.role!r} (use system, user, assistant or tool)")
    last = messages[-1]
    if last.role not in ("user", "tool"):
        raise RequestError(f"the last message must come from the user or a tool, not {last.role!r}")
    if last.role == "user" and not last.text.strip():
        raise RequestError("the prompt is empty: say what you want to know (for example -p 'describe this image')")


def _tool_call_dict(call: ToolCall) -> dict[str, Any]:
    return {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def to_template_messages(messages: list[Message]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages for ``apply_chat_template`` and the PIL images in the order their placeholders appear
    (videos: see :func:`template_videos`)."""
    out: list[dict[str, Any]] = []
    images: list[Any] = []
    for m in messages:
        parts: list[dict[str, Any]] = []
        for c in m.content:
            if isinstance(c, LoadedImage):
                parts.append({"type": "image"})
                images.append(c.image)
            elif _is_video(c):
                parts.append({"type": "video"})
            elif c:
                parts.append({"type": "text", "text": c})
        entry: dict[str, Any] = {"role": m.role, "content": parts}
        if m.tool_calls:
            entry["tool_calls"] = [_tool_call_dict(c) for c in m.tool_calls]
        if m.role == "assistant" and m.reasoning:
            entry["reasoning_content"] = m.reasoning
        out.append(entry)
    return out, images


def template_videos(messages: list[Message]) -> list[Any]:
    """The videos of a conversation in the order their placeholders appear."""
    return [v for m in messages for v in m.videos]

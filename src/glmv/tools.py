"""Native multimodal tool calling: a small tool registry and the built-in tools.

GLM-4.6V calls tools in its ``<tool_call>`` format (parsed by :mod:`glmv.parsing`) and reads what tools
return, images included, as ``tool`` messages. The loop that generates, runs each call, feeds the result
back and continues is a task (:func:`glmv.tasks.ask` with ``tools``); this module only knows the tools. A bad
call (unknown tool, malformed arguments, a box outside the image, a tool that fails) becomes an error message
fed back to the model, never a crash.

Built-in tools:
- ``crop``: a box in the model's 0-1000 coordinates on one of the input images (or PDF pages), returned
  enlarged, for reading small print and checking details;
- ``render_html``: renders HTML in headless Chromium (:mod:`glmv.render`) at a desktop or phone viewport,
  with the network blocked, and returns the screenshot.
Users add their own with :meth:`ToolRegistry.register`; a built-in tool is a :class:`Tool` here, listed in
:func:`default_registry` (every front end's tool loop gets it from there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import GlmvError
from .media import LoadedImage
from .parsing import ToolCall
from .render import render_html



class ToolError(GlmvError):
    """A tool call that cannot be carried out; its message goes back to the model."""


@dataclass
class ToolContext:
    """What tools may look at: the conversation's input images (index 0, 1, ...)."""

    images: list[LoadedImage] = field(default_factory=list)


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments
    fn: Callable[[dict[str, Any], ToolContext], list[Any]]  # returns text and/or LoadedImage items

    def schema(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


_TYPES = {"string": str, "integer": int, "number": (int, float), "array": list, "object": dict, "boolean": bool}


def check_arguments(tool: Tool, args: dict[str, Any]) -> None:
    props = tool.parameters.get("properties", {})
    for key in tool.parameters.get("required", []):
        if key not in args:
            raise ToolError(f"{tool.name}: missing argument '{key}'")
    for key, value in args.items():
        if key not in props:
            raise ToolError(f"{tool.name}: unknown argument '{key}' (expected: {', '.join(props)})")
        want = props[key].get("type")
        if want in _TYPES and (not isinstance(value, _TYPES[want]) or (want != "boolean" and isinstance(value, bool))):
            raise ToolError(f"{tool.name}: argument '{key}' must be a {want}, got {json.dumps(value)[:60]}")
        if "enum" in props[key] and value not in props[key]["enum"]:
            raise ToolError(f"{tool.name}: argument '{key}' must be one of {props[key]['enum']}")


class ToolRegistry:
    def __init__(self, tools: list[Tool] | None = None) -> None:
        self.tools: dict[str, Tool] = {}
        for t in tools or []:
            self.register(t)

    def register(self, tool: Tool) -> None:
        self.tools[tool.name] = tool

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    def call(self, call: ToolCall, ctx: ToolContext) -> tuple[list[Any], str | None]:
        """Run a call; returns (content for the tool message, error text or None)."""
        tool = self.tools.get(call.name)
        try:
            if tool is None:
                raise ToolError(f"unknown tool '{call.name}'; available: {', '.join(self.tools) or 'none'}")
            if "_raw" in call.arguments:
                raise ToolError(f"{call.name}: the arguments are not valid JSON")
            check_arguments(tool, call.arguments)
            return tool.fn(call.arguments, ctx), None
        except ToolError as exc:
            msg = f"error: {exc}"
        except GlmvError as exc:
            msg = f"error: {call.name}: {exc}"
        except Exception as exc:  # a tool's own bug: reported to the model, the loop goes on
            msg = f"error: {call.name} failed: {type(exc).__name__}: {exc}"
        return [msg], msg


# -- built-in tools ------------------------------------------------------------------------------------
def crop_tool(args: dict[str, Any], ctx: ToolContext) -> list[Any]:
    from PIL import Image

    index = args.get("image", 0)
    if not ctx.images:
        raise ToolError("crop: there is no input image to crop")
    if not isinstance(index, int) or not 0 <= index < len(ctx.images):
        raise ToolError(f"crop: image index {index} is out of range (0..{len(ctx.images) - 1})")
    box = args["box"]
    if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise ToolError(f"crop: box must be [x1, y1, x2, y2] on a 0-1000 scale, got {json.dumps(box)[:60]}")
    x1, y1, x2, y2 = box
    if not (0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000):
        raise ToolError(f"crop: box {box} is outside the image or empty (need 0 <= x1 < x2 <= 1000, 0 <= y1 < y2 <= 1000)")
    img = ctx.images[index].image
    w, h = img.size
    region = img.crop((int(x1 * w / 1000), int(y1 * h / 1000), max(int(x2 * w / 1000), int(x1 * w / 1000) + 1),
                       max(int(y2 * h / 1000), int(y1 * h / 1000) + 1)))
    long_side = int(args.get("size", 1024))
    scale = long_side / max(region.size)
    region = region.resize((max(1, int(region.width * scale)), max(1, int(region.height * scale))), Image.Resampling.LANCZOS)
    return [LoadedImage(region, f"crop of image {index} {box}", region.size),
            f"crop of image {index}, box {box}, enlarged to {region.width}x{region.height}"]


CROP = Tool(
    "crop",
    "Zoom into a region of an input image to read small print or check details. The box is [x1, y1, x2, y2] "
    "on a 0-1000 scale of the image's width and height. Returns the region enlarged.",
    {"type": "object", "properties": {
        "box": {"type": "array", "items": {"type": "number"}, "description": "[x1, y1, x2, y2], 0-1000"},
        "image": {"type": "integer", "description": "which input image (0 = the first)"},
        "size": {"type": "integer", "description": "long side of the returned image in pixels (default 1024)"}},
     "required": ["box"]},
    crop_tool,
)


def render_html_tool(args: dict[str, Any], ctx: ToolContext) -> list[Any]:
    viewport = args.get("viewport", "desktop")
    img = render_html(args["html"], viewport)
    return [LoadedImage(img, f"render ({viewport})", img.size),
            f"the page rendered at the {viewport} viewport ({img.width}x{img.height})"]


RENDER_HTML = Tool(
    "render_html",
    "Render an HTML page in a browser and look at the screenshot, to check your own front-end code.",
    {"type": "object", "properties": {
        "html": {"type": "string", "description": "the complete HTML document"},
        "viewport": {"type": "string", "enum": ["desktop", "phone"], "description": "default desktop"}},
     "required": ["html"]},
    render_html_tool,
)


def default_registry() -> ToolRegistry:
    return ToolRegistry([CROP, RENDER_HTML])


# -- what the loop records of each call ------------------------------------------------------------------
@dataclass
class Step:
    """One tool call as carried out: what was asked, what came back (text, image sizes), how long it took."""

    name: str
    arguments: dict[str, Any]
    error: str | None
    text: str
    images: list[tuple[int, int]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"tool": self.name, "arguments": self.arguments, "error": self.error, "result": self.text,
                "images": [list(s) for s in self.images], "seconds": round(self.seconds, 3)}

    def line(self) -> str:
        args = json.dumps(self.arguments, ensure_ascii=False)
        if len(args) > 120:
            args = args[:117] + "..."
        out = self.error or (self.text + "".join(f" [image {w}x{h}]" for w, h in self.images))
        return f"⚙ {self.name}({args}) → {out}"


def __getattr__(name: str) -> Any:
    """``run_tool_loop`` was defined here before the task layer, and the README showed it imported from here:
    the name still resolves (lazily: the loop lives in :mod:`glmv.tasks`, which imports this module)."""
    if name == "run_tool_loop":
        from .tasks import run_tool_loop

        return run_tool_loop
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Splitting GLM output into thinking, answer, HTML and tool calls.

GLM-4.6V writes ``<think>reasoning</think>`` and then its answer, often wrapped in box markers
(``<|begin_of_box|>``/``<|end_of_box|>``) or ``<answer>`` tags, and may call tools in its
``<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>`` format. This module owns
that split, once, for every front end. One state machine (:class:`StreamParser`) does the work both
for streams (fed a piece at a time, it emits deltas as soon as they are certain) and for whole texts
(:func:`parse_output` feeds everything at once), so streamed and final results always agree.

The input must be text decoded with special tokens kept: decoding with ``skip_special_tokens=True``
deletes ``<think>`` and the box markers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

Part = Literal["thinking", "answer"]

# Markers that switch state. Everything else that looks like a special token is dropped.
_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
_TOOL_OPEN = "<tool_call>"
_TOOL_CLOSE = "</tool_call>"
_BOX_MARKERS = ("<|begin_of_box|>", "<|end_of_box|>")
_DROPPED = (
    "<answer>",
    "</answer>",
    "<|endoftext|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|observation|>",
    "[gMASK]",
    "<sop>",
    "<eop>",
    "/nothink",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
)
_ALL_TAGS = (_THINK_OPEN, _THINK_CLOSE, _TOOL_OPEN, _TOOL_CLOSE, *_BOX_MARKERS, *_DROPPED)
_TAG_RE = re.compile("|".join(re.escape(t) for t in sorted(_ALL_TAGS, key=len, reverse=True)))
_LONGEST_TAG = max(len(t) for t in _ALL_TAGS)


@dataclass
class ToolCall:
    """One parsed ``<tool_call>``: the function name and its arguments (JSON values decoded)."""

    name: str
    arguments: dict[str, Any]
    raw: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


@dataclass
class ParsedOutput:
    """The parts of one model answer."""

    thinking: str = ""
    answer: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    html: str | None = None
    # True when the text ended inside <think> or inside a <tool_call> (cut off by the token limit).
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "thinking": self.thinking,
            "answer": self.answer,
            "html": self.html,
            "tool_calls": [c.to_dict() for c in self.tool_calls],
            "truncated": self.truncated,
        }


@dataclass
class Delta:
    """A piece of streamed text and the part it belongs to."""

    part: Part
    text: str


def _partial_tag_start(text: str) -> int:
    """Index where a possibly unfinished tag begins at the end of ``text`` (len(text) if none)."""
    start = max(0, len(text) - _LONGEST_TAG + 1)
    for i in range(start, len(text)):
        tail = text[i:]
        if tail[0] in "<[/" and any(t.startswith(tail) for t in _ALL_TAGS):
            return i
    return len(text)


class StreamParser:
    """Incremental parser: ``feed`` text pieces, get :class:`Delta` lists back, ``finish`` at the end.

    ``thinking_open`` says the prompt already opened ``<think>`` (some templates pre-fill it), so the
    output starts inside the reasoning.
    """

    def __init__(self, thinking_open: bool = False) -> None:
        self._pending = ""  # text not yet classified (may end in a partial tag)
        self._state: str = "thinking" if thinking_open else "start"
        self._tool_buf = ""
        self._in_box = False
        self._box_start = False  # just after <|begin_of_box|>: padding spaces are dropped
        self._box_hold = ""  # spaces inside a box, held until we know they are not padding
        self._lead = {"thinking": True, "answer": True}  # still stripping leading whitespace
        self._parts: dict[str, list[str]] = {"thinking": [], "answer": []}
        self.tool_calls: list[ToolCall] = []
        self._finished = False

    # -- public API -------------------------------------------------------------------------
    def feed(self, text: str) -> list[Delta]:
        if self._finished:
            raise RuntimeError("StreamParser.feed() after finish()")
        self._pending += text
        return self._drain(final=False)

    def finish(self) -> list[Delta]:
        out = self._drain(final=True)
        self._finished = True
        return out

    @property
    def state(self) -> str:
        return self._state

    def result(self) -> ParsedOutput:
        """The parse so far (call after :meth:`finish` for the final one)."""
        answer = "".join(self._parts["answer"]).strip()
        truncated = self._state in ("thinking", "tool") and self._finished
        if self._state == "tool" and self._finished and self._tool_buf.strip():
            # A cut-off tool call is never executed; its raw text stays visible in the answer.
            answer = (answer + "\n" + _TOOL_OPEN + self._tool_buf).strip()
        return ParsedOutput(
            thinking="".join(self._parts["thinking"]).strip(),
            answer=answer,
            tool_calls=list(self.tool_calls),
            html=extract_html(answer),
            truncated=truncated,
        )

    # -- internals ------------------------------------------------------------------------
    def _emit(self, part: Part, text: str, out: list[Delta]) -> None:
        if not text:
            return
        if self._lead[part]:
            text = text.lstrip()
            if not text:
                return
            self._lead[part] = False
        self._parts[part].append(text)
        if out and out[-1].part == part:
            out[-1].text += text
        else:
            out.append(Delta(part, text))

    def _text(self, text: str, out: list[Delta]) -> None:
        if self._state == "start":
            stripped = text.lstrip()
            if not stripped:
                return
            self._state = "answer"
            text = stripped
        if self._state == "tool":
            self._tool_buf += text
            return
        part: Part = "thinking" if self._state == "thinking" else "answer"
        if self._in_box and part == "answer":
            # The model pads box contents with spaces ("<|begin_of_box|> 42 <|end_of_box|>").
            if self._box_start:
                text = text.lstrip(" ")
                if not text:
                    return
                self._box_start = False
            text = self._box_hold + text
            body = text.rstrip(" ")
            self._box_hold = text[len(body) :]
            text = body
        self._emit(part, text, out)

    def _tag(self, tag: str, out: list[Delta]) -> None:
        state = self._state
        if state == "tool":
            if tag == _TOOL_CLOSE:
                call = parse_tool_call(self._tool_buf)
                if call is not None:
                    self.tool_calls.append(call)
                self._tool_buf = ""
                self._state = "answer"
            else:
                self._tool_buf += tag
            return
        if tag == _THINK_OPEN:
            if state in ("start", "answer"):
                self._state = "thinking"
                if self._parts["thinking"]:
                    self._emit("thinking", "\n\n", out)
            return
        if tag == _THINK_CLOSE:
            if state in ("thinking", "start"):
                self._state = "answer"
            return
        if tag == _TOOL_OPEN:
            if state == "thinking":
                return  # reasoning that mentions the tag is still reasoning
            self._state = "tool"
            self._tool_buf = ""
            return
        if tag in _BOX_MARKERS:
            if state == "start":
                self._state = "answer"
            self._in_box = tag == _BOX_MARKERS[0]
            self._box_start = self._in_box
            self._box_hold = ""
            return
        # Any other special token carries no text.

    def _drain(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        text = self._pending
        pos = 0
        for m in _TAG_RE.finditer(text):
            self._text(text[pos : m.start()], out)
            self._tag(m.group(0), out)
            pos = m.end()
        rest = text[pos:]
        if final:
            self._text(rest, out)
            self._pending = ""
        else:
            cut = _partial_tag_start(rest)
            self._text(rest[:cut], out)
            self._pending = rest[cut:]
        return [d for d in out if d.text]


def parse_output(text: str, thinking_open: bool | None = None) -> ParsedOutput:
    """Parse one whole model answer (decoded with special tokens kept).

    When ``thinking_open`` is None it is inferred: a ``</think>`` with no ``<think>`` before it means
    the prompt opened the reasoning.
    """
    if thinking_open is None:
        close = text.find(_THINK_CLOSE)
        opened = text.find(_THINK_OPEN)
        thinking_open = close != -1 and (opened == -1 or opened > close)
    parser = StreamParser(thinking_open=thinking_open)
    parser.feed(text)
    parser.finish()
    return parser.result()


# -- tool calls ---------------------------------------------------------------------------------
_ARG_RE = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def _decode_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, TypeError):
        return raw


def parse_tool_call(body: str) -> ToolCall | None:
    """Parse the text between ``<tool_call>`` and ``</tool_call>``; None if it names no function.

    Accepts GLM's XML-ish form and, as some fine-tunes emit it, a JSON object with name/arguments.
    """
    raw = body
    body = body.strip()
    if body.startswith("{"):
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", {})
        if isinstance(args, str):
            args = _decode_value(args)
        return ToolCall(obj["name"], args if isinstance(args, dict) else {"value": args}, raw)
    first = body.find("<arg_key>")
    name = (body if first == -1 else body[:first]).strip()
    if not name or "\n" in name or "<" in name:
        return None
    args = {k.strip(): _decode_value(v) for k, v in _ARG_RE.findall(body)}
    return ToolCall(name, args, raw)


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """Render a call in GLM's format (the inverse of :func:`parse_tool_call`)."""
    lines = [f"{_TOOL_OPEN}{name}"]
    for key, value in arguments.items():
        val = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        lines.append(f"<arg_key>{key}</arg_key>\n<arg_value>{val}</arg_value>")
    return "\n".join(lines) + f"\n{_TOOL_CLOSE}"


# -- HTML -------------------------------------------------------------------------------------
_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_HTML_START_RE = re.compile(r"<!DOCTYPE\s+html|<html[\s>]", re.I)
_HTML_END_RE = re.compile(r"</html\s*>", re.I)


def _looks_like_html(code: str) -> bool:
    return bool(_HTML_START_RE.search(code) or re.search(r"<(body|div|head)[\s>]", code, re.I))


def _inline_assets(html: str, css: list[str], js: list[str]) -> str:
    """Fold separate CSS/JS fences into the page so it is one self-contained file."""
    if css:
        style = "<style>\n" + "\n".join(css) + "\n</style>\n"
        m = re.search(r"</head\s*>", html, re.I)
        html = html[: m.start()] + style + html[m.start() :] if m else style + html
    if js:
        script = "<script>\n" + "\n".join(js) + "\n</script>\n"
        m = re.search(r"</body\s*>", html, re.I)
        html = html[: m.start()] + script + html[m.start() :] if m else html + "\n" + script
    return html


def extract_html(answer: str) -> str | None:
    """The HTML page in an answer: a fenced block (```html) or raw HTML; None when there is none.

    With several fences the largest HTML block wins and separate ```css / ```js blocks are inlined.
    """
    fences = [(lang.lower(), code) for lang, code in _FENCE_RE.findall(answer)]
    html_blocks = [c for lang, c in fences if lang in ("html", "htm", "xhtml") or (not lang and _looks_like_html(c))]
    if not html_blocks:
        html_blocks = [c for lang, c in fences if _HTML_START_RE.search(c)]
    if html_blocks:
        page = max(html_blocks, key=len).strip()
        css = [c.strip() for lang, c in fences if lang == "css" and c.strip() not in page]
        js = [c.strip() for lang, c in fences if lang in ("js", "javascript") and c.strip() not in page]
        return _inline_assets(page, css, js) + "\n"
    m = _HTML_START_RE.search(answer)
    if not m:
        return None
    tail = answer[m.start() :]
    ends = list(_HTML_END_RE.finditer(tail))
    page = tail[: ends[-1].end()] if ends else tail
    return page.strip() + "\n"

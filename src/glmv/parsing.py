"""Splitting GLM output into thinking, answer, HTML and tool calls.

GLM-4.6V writes ``<think>reasoning</think>`` and then its answer, often wrapped in box markers
(``<|begin_of_box|>``/``<|end_of_box|>``) or ``<answer>`` tags, and may call tools in its
``<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>`` format. This module owns
that split, once, for every front end. One state machine (:class:`StreamParser`) does the work both
for streams (fed a piece at a time, it emits deltas as soon as they are certain) and for whole texts
(:func:`parse_output` feeds everything at once), so streamed and final results always agree.

Tool-call arguments follow vLLM's glm45 parser: a parameter the request's JSON schema declares as
``"type": "string"`` keeps its text as is; any other value is read as JSON, then as a Python literal, else kept as
text. While streaming, a call's arguments arrive as JSON text fragments (string values piece by piece), and the
fragments of a call always join to the same JSON text a whole-text parse gives. Grounding boxes (``[x1,y1,x2,y2]``
on GLM's 0-1000 scale, in the bracket styles the GLM-V README lists) are read from the answer.

Decode with special tokens kept: ``<|endoftext|>`` and the other control tokens are dropped here.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from .tokens import (ARG_VALUE_CLOSE, ARG_VALUE_OPEN, BOX_CLOSE, BOX_OPEN, NOTHINK, SPECIAL_TOKENS, THINK_CLOSE,
                     THINK_OPEN, TOOL_CLOSE, TOOL_OPEN)

Part = Literal["thinking", "answer", "tool"]

# Markers that switch state. Everything else that looks like a special token is dropped.
_BOX_MARKERS = (BOX_OPEN, BOX_CLOSE)
_DROPPED = ("<answer>", "</answer>", NOTHINK, *SPECIAL_TOKENS)  # GLM-4.5V's answer tags and the control tokens
_ALL_TAGS = (THINK_OPEN, THINK_CLOSE, TOOL_OPEN, TOOL_CLOSE, *_BOX_MARKERS, *_DROPPED)
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

    def arguments_json(self) -> str:
        """The arguments as the OpenAI API carries them (what streamed fragments join to)."""
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass
class PartialCall:
    """A tool call cut off before ``</tool_call>`` (by the token limit): never executed. ``arguments`` is the
    JSON text as far as it got, exactly what was streamed."""

    name: str
    arguments: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


@dataclass
class Box:
    """A grounding box: ``coords`` on GLM's 0-1000 scale (x1, y1, x2, y2), ``pixels`` for the image size given."""

    coords: tuple[float, float, float, float]
    label: str | None = None
    pixels: tuple[int, int, int, int] | None = None

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        x1, y1, x2, y2 = self.coords
        return (round(x1 * width / 1000), round(y1 * height / 1000), round(x2 * width / 1000), round(y2 * height / 1000))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"label": self.label, "box": [_num(v) for v in self.coords]}
        if self.pixels is not None:
            d["pixels"] = list(self.pixels)
        return d


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else v


@dataclass
class ParsedOutput:
    """The parts of one model answer."""

    thinking: str = ""
    answer: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    html: str | None = None
    # True when the text ended inside <think> or inside a <tool_call> (cut off by the token limit).
    truncated: bool = False
    cut_call: PartialCall | None = None
    boxes: list[Box] = field(default_factory=list)

    def with_image_size(self, width: int, height: int) -> "ParsedOutput":
        """Fill in the boxes' pixel coordinates for an image of ``width`` x ``height``."""
        for b in self.boxes:
            b.pixels = b.to_pixels(width, height)
        return self

    def to_dict(self) -> dict[str, Any]:
        d = {
            "thinking": self.thinking,
            "answer": self.answer,
            "html": self.html,
            "tool_calls": [c.to_dict() for c in self.tool_calls],
            "truncated": self.truncated,
            "boxes": [b.to_dict() for b in self.boxes],
        }
        if self.cut_call is not None:
            d["cut_off_tool_call"] = self.cut_call.to_dict()
        return d


@dataclass
class Delta:
    """A piece of streamed text and the part it belongs to. For ``part == "tool"`` the text is a fragment of
    call ``index``'s JSON arguments; the call's first delta carries its ``name`` (and may have no text)."""

    part: Part
    text: str
    index: int = -1
    name: str | None = None


@dataclass
class _CallState:
    index: int
    name: str | None = None
    valid: bool = True
    sent: str = ""  # arguments JSON text streamed so far


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
    output starts inside the reasoning. ``tools`` (OpenAI-style schemas) decide which arguments stay strings;
    with ``tools_enabled=False`` (a request without tools, or ``tool_choice: "none"``) tool-call markup is
    plain answer text, as vLLM and SGLang treat it.
    """

    def __init__(self, thinking_open: bool = False, tools: list[dict[str, Any]] | None = None,
                 tools_enabled: bool = True) -> None:
        self._tools = tools
        self._tools_enabled = tools_enabled
        self._call: _CallState | None = None
        self._n_calls = 0
        self._cut_text = False
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
        truncated = (self._state in ("thinking", "tool") or self._cut_text) and self._finished
        cut = None
        if self._finished and self._call is not None and self._call.name is not None and self._call.valid:
            cut = PartialCall(self._call.name, self._call.sent)  # never executed; reported as far as it got
        return ParsedOutput(
            thinking="".join(self._parts["thinking"]).strip(),
            answer=answer,
            tool_calls=list(self.tool_calls),
            html=extract_html(answer),
            truncated=truncated,
            cut_call=cut,
            boxes=extract_boxes(answer),
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
            self._tool_progress(out)
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
            if tag == TOOL_CLOSE:
                self._tool_done(out)
            else:
                self._tool_buf += tag
            return
        if tag in (TOOL_OPEN, TOOL_CLOSE) and not self._tools_enabled and state != "thinking":
            self._text(tag, out)  # no tools in this request: the markup is just text
            return
        if tag == THINK_OPEN:
            if state in ("start", "answer"):
                self._state = "thinking"
                if self._parts["thinking"]:
                    self._emit("thinking", "\n\n", out)
            return
        if tag == THINK_CLOSE:
            if state in ("thinking", "start"):
                self._state = "answer"
            return
        if tag == TOOL_OPEN:
            if state == "thinking":
                return  # reasoning that mentions the tag is still reasoning
            self._state = "tool"
            self._tool_buf = ""
            self._call = _CallState(self._n_calls)
            self._n_calls += 1
            return
        if tag in _BOX_MARKERS:
            if state == "start":
                self._state = "answer"
            self._in_box = tag == _BOX_MARKERS[0]
            self._box_start = self._in_box
            self._box_hold = ""
            return
        # Any other special token carries no text.

    def _tool_progress(self, out: list[Delta]) -> None:
        """Stream what is certain of the call being written: its name, then its arguments' JSON text."""
        st = self._call
        if st is None or not st.valid:
            return
        buf = self._tool_buf.lstrip()  # as parse_tool_call reads it: a newline may come before the name
        if st.name is None:
            if buf.startswith("{"):
                return  # the JSON form: known only when complete
            cut = _name_end(buf)
            if cut is None:
                return
            name = _clean_name(buf[:cut])
            if not _NAME_RE.match(name):
                st.valid = False
                return
            st.name = name
            out.append(Delta("tool", "", st.index, name))
        built = _arguments_so_far(st.name, buf[_name_end(buf) or 0 :], self._tools)
        if len(built) > len(st.sent) and built.startswith(st.sent):
            out.append(Delta("tool", built[len(st.sent) :], st.index))
            st.sent = built

    def _tool_done(self, out: list[Delta]) -> None:
        st = self._call
        call = parse_tool_call(self._tool_buf, self._tools)
        if call is not None and st is not None and st.valid:
            full = call.arguments_json()
            if st.name is None:
                out.append(Delta("tool", full, st.index, call.name))
            elif full.startswith(st.sent) and len(full) > len(st.sent):
                out.append(Delta("tool", full[len(st.sent) :], st.index))
            self.tool_calls.append(call)
        self._tool_buf = ""
        self._call = None
        self._state = "answer"

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
            if self._state == "tool" and (self._call is None or self._call.name is None or not self._call.valid):
                # Cut off before the name was complete: nothing was streamed as a call, so it stays text.
                self._state = "answer"
                self._cut_text = True
                self._emit("answer", TOOL_OPEN + self._tool_buf, out)
                self._call = None
        else:
            cut = _partial_tag_start(rest)
            self._text(rest[:cut], out)
            self._pending = rest[cut:]
        return [d for d in out if d.text or d.name]


def parse_output(text: str, thinking_open: bool | None = None, tools: list[dict[str, Any]] | None = None,
                 tools_enabled: bool = True, image_size: tuple[int, int] | None = None) -> ParsedOutput:
    """Parse one whole model answer (decoded with special tokens kept).

    When ``thinking_open`` is None it is inferred: a ``</think>`` with no ``<think>`` before it means
    the prompt opened the reasoning. ``image_size`` (width, height) fills in the boxes' pixel coordinates.
    """
    if thinking_open is None:
        close = text.find(THINK_CLOSE)
        opened = text.find(THINK_OPEN)
        thinking_open = close != -1 and (opened == -1 or opened > close)
    parser = StreamParser(thinking_open=thinking_open, tools=tools, tools_enabled=tools_enabled)
    parser.feed(text)
    parser.finish()
    result = parser.result()
    return result.with_image_size(*image_size) if image_size else result


# -- tool calls ---------------------------------------------------------------------------------
# Between a key and its value: whitespace, or GLM-4.6's literal backslash-n (SGLang's raw-output case).
_ARG_RE = re.compile(r"<arg_key>(.*?)</arg_key>(?:\s|\\n)*<arg_value>(.*?)</arg_value>", re.S)
_ARG_KEY_RE = re.compile(r"<arg_key>(.*?)</arg_key>", re.S)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")
_LITERAL_EVAL_MAX = 100_000  # ast.literal_eval on huge text is slow and can exhaust the stack


def _name_end(buf: str) -> int | None:
    """Where the function name ends (the first newline or ``<arg_key>``); None while it may still grow."""
    ends = [i for i in (buf.find("\n"), buf.find("<arg_key>")) if i != -1]
    return min(ends) if ends else None


def _clean_name(raw: str) -> str:
    # GLM-4.6 sometimes writes a literal backslash-n after the name (SGLang's raw-output case).
    name = raw.strip()
    while name.endswith("\\n"):
        name = name[:-2].rstrip()
    return name


def _schema_of(tools: list[dict[str, Any]] | None, name: str, key: str) -> dict[str, Any] | None:
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and fn.get("name") == name:
            props = (fn.get("parameters") or {}).get("properties") or {}
            prop = props.get(key)
            return prop if isinstance(prop, dict) else None
    return None


def _is_string_param(tools: list[dict[str, Any]] | None, name: str, key: str) -> bool:
    """True when the request's schema declares ``key`` a string (``"string"``, ``["string", "null"]`` or an
    anyOf/oneOf with a string branch), as vLLM reads it."""
    prop = _schema_of(tools, name, key)
    if prop is None:
        return False
    kind = prop.get("type")
    if kind == "string" or (isinstance(kind, list) and "string" in kind):
        return True
    branches = (prop.get("anyOf") or []) + (prop.get("oneOf") or [])
    return any(isinstance(b, dict) and b.get("type") == "string" for b in branches)


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def _decode_value(raw: str) -> Any:
    """An undeclared (or non-string) argument: JSON, then escaped JSON (GLM-4.6's raw output, from SGLang's
    tests), then a Python literal (``True``, single quotes), else the text itself (vLLM's order)."""
    text = raw.strip()
    try:
        value = json.loads(text)
        if _json_safe(value):
            return value
    except (ValueError, TypeError):
        pass
    if '\\"' in text:
        try:
            value = json.loads(json.loads(f'"{text}"'))
            if _json_safe(value):
                return value
        except (ValueError, TypeError):
            pass
    if len(text) <= _LITERAL_EVAL_MAX:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = ast.literal_eval(text)
            if _json_safe(value) and not isinstance(value, (tuple, set)):
                return value
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
    return text


def _argument(tools: list[dict[str, Any]] | None, name: str, key: str, raw: str) -> Any:
    return raw if _is_string_param(tools, name, key) else _decode_value(raw)


def _arguments_so_far(name: str, body: str, tools: list[dict[str, Any]] | None) -> str:
    """The arguments' JSON text as far as it is certain: every complete pair, then the open value of a
    string parameter (escaped, without its closing quote). Only ever grows, so it can be streamed."""
    parts = [f"{json.dumps(k.strip(), ensure_ascii=False)}: "
             f"{json.dumps(_argument(tools, name, k.strip(), v), ensure_ascii=False)}" for k, v in _ARG_RE.findall(body)]
    opened = body.rfind(ARG_VALUE_OPEN)
    if opened > body.rfind(ARG_VALUE_CLOSE):
        keys = _ARG_KEY_RE.findall(body[:opened])
        key = keys[-1].strip() if keys else None
        if key is not None and _is_string_param(tools, name, key):
            value = body[opened + len(ARG_VALUE_OPEN) :]
            value = value[: len(value) - _overlap(value, ARG_VALUE_CLOSE)]
            parts.append(f'{json.dumps(key, ensure_ascii=False)}: "{json.dumps(value, ensure_ascii=False)[1:-1]}')
    return "{" + ", ".join(parts)


def _overlap(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (a tag possibly cut in half)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def parse_tool_call(body: str, tools: list[dict[str, Any]] | None = None) -> ToolCall | None:
    """Parse the text between ``<tool_call>`` and ``</tool_call>``; None if it names no function.

    Accepts GLM's XML-ish form and, as some fine-tunes emit it, a JSON object with name/arguments. ``tools``
    (OpenAI-style schemas) say which parameters are strings and keep their text as is.
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
    cut = _name_end(body)
    name = _clean_name(body if cut is None else body[:cut])
    if not _NAME_RE.match(name):
        return None
    args = {k.strip(): _argument(tools, name, k.strip(), v) for k, v in _ARG_RE.findall(body)}
    return ToolCall(name, args, raw)


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """Render a call in GLM's format (the inverse of :func:`parse_tool_call`)."""
    lines = [f"{TOOL_OPEN}{name}"]
    for key, value in arguments.items():
        val = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        lines.append(f"<arg_key>{key}</arg_key>\n<arg_value>{val}</arg_value>")
    return "\n".join(lines) + f"\n{TOOL_CLOSE}"


# -- grounding boxes ------------------------------------------------------------------------------
# GLM-V's README: boxes are [x1,y1,x2,y2] scaled to 0-1000, "the bracket style may vary ([], [[]], (), <>, etc.)",
# usually inside <|begin_of_box|>...<|end_of_box|> (which the parser has already unwrapped from the answer).
_NUM = r"(-?\d+(?:\.\d+)?)"
_SEP = r"\s*[,，]\s*"
_BOX_RE = re.compile(r"[\[(<{]\s*" + _SEP.join([_NUM] * 4) + r"\s*[\])>}]")
_LABEL_KEYS = ("label", "name", "category", "object", "text")
_BOX_KEYS = ("bbox_2d", "bbox", "box_2d", "box")
_NOT_LABEL_ENDS = {"at", "in", "on", "is", "are", "of", "the", "a", "an", "to", "by", "near", "located", "box", "boxes",
                   "coordinates", "be", "was", "were", "and", "or", "from", "within", "around", "with"}
_SENTENCE_RE = re.compile(r"[，。？！；,.?!;]|box")
_LABEL_TAIL_RE = re.compile(r"([^\n\[\](){}<>:：]{1,60}?)\s*[:：]?\s*[\[(<{]*\s*$")


def _as_box(nums: list[str]) -> tuple[float, float, float, float] | None:
    x1, y1, x2, y2 = (float(n) for n in nums)
    if not all(0 <= v <= 1000 for v in (x1, y1, x2, y2)):
        return None
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    return x1, y1, x2, y2


def _json_boxes(answer: str) -> list[Box]:
    """Boxes written as JSON objects (``{"label": "cat", "bbox_2d": [...]}``), alone or in a list."""
    found: list[Box] = []
    for m in re.finditer(r"\{[^{}]*\}", answer):
        try:
            obj = json.loads(m.group(0))
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        coords = next((obj[k] for k in _BOX_KEYS if k in obj), None)
        if isinstance(coords, list) and len(coords) == 1 and isinstance(coords[0], list):
            coords = coords[0]
        if not (isinstance(coords, list) and len(coords) == 4 and all(isinstance(v, (int, float)) for v in coords)):
            continue
        box = _as_box([str(v) for v in coords])
        label = next((obj[k] for k in _LABEL_KEYS if isinstance(obj.get(k), str)), None)
        if box is not None:
            found.append(Box(box, label))
    return found


def _label_before(text: str) -> str | None:
    """A short label written just before a box on its line: ``cat: [[...]]``, ``- **red car** [...]``."""
    line = text.rsplit("\n", 1)[-1]
    line = re.sub(r"[*_`#>\"']", "", line)
    line = re.sub(r"^\s*(?:[-•]|\d+[.)])\s*", "", line)
    m = _LABEL_TAIL_RE.search(line)
    if not m:
        return None
    label = m.group(1).strip(" ,;-")
    words = label.lower().split()
    if not words or len(words) > 6 or len(label) > 40 or words[-1] in _NOT_LABEL_ENDS or _SENTENCE_RE.search(label):
        return None  # a sentence leading into the box ("... is at [[...]]"), not a name for it
    return label


def extract_boxes(answer: str) -> list[Box]:
    """Every grounding box in an answer, in order, with a label when one is written next to it."""
    boxes = _json_boxes(answer)
    if boxes:
        return boxes
    out: list[Box] = []
    last = 0
    for m in _BOX_RE.finditer(answer):
        box = _as_box(list(m.groups()))
        if box is None:
            continue
        between = answer[last : m.start()]
        label = _label_before(between) if between.strip(" [(<{,\n") else (out[-1].label if out else None)
        out.append(Box(box, label))
        last = m.end()
    return out


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

"""The ``glmv`` command line: ``ask``, ``ocr``, ``html``, ``chat``, ``logs``, ``start``/``stop``/``ps``, and the
front ends (``ui``, ``serve``, ``batch``, ``bench``).

Flags map explicitly onto :class:`~glmv.settings.Settings` and
:class:`~glmv.settings.SamplingParams`; everything is validated (flags, images, prompt) before the
model is loaded. Errors, argument errors included, print one line ``error: ...`` and exit 2 without a
traceback (``--debug`` shows one); a mistyped flag gets a suggestion. Flags a command would ignore are
refused. When ``glmv start`` keeps a matching model loaded, tasks run on it (see :mod:`glmv.resident`);
answers are logged to the history (:mod:`glmv.history`). Only what a command needs is imported: help,
argument errors, the resident path and remote backends never import torch. The tutorial's flags
(``--model_path``, ``--input``, ``--prompt``, ``--int4``, ``--stream``) keep working, and ``glmv`` with
no command does what the tutorial did: describe ``input/image_1.png``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

from . import __version__, tasks
from .backends.base import Backend, Chunk, Result, check_backend
from .errors import GlmvError
from .limits import Budget, add_limit_arguments, limits_from_args
from .privacy import redact_text
from .prompts import TASKS, Message, user_message
from .settings import (DEFAULT_LONG_SIDE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_PIXELS, SAMPLING_BOUNDS, TINY_MODEL,
                       SamplingParams, Settings)
from .tools import default_registry

DEFAULT_IMAGE = "input/image_1.png"
SUBCOMMANDS = ("ask", "ocr", "html")
MODEL_FLAGS = ("model", "quant", "engine", "dtype", "device")  # what a remote server decides for itself
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_HTML_DIR = "html_code"  # where html and the web app save pages

BackendFactory = Callable[[Settings], Backend]


# -- argument parsing ---------------------------------------------------------------------------
class UsageError(GlmvError):
    """A command line argparse could not take, said in one line."""


class ArgParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one :class:`UsageError` line instead of a usage dump."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(_friendly_usage_error(message, self))


def _friendly_usage_error(message: str, parser: argparse.ArgumentParser) -> str:
    help_hint = f"({parser.prog} --help lists the options)"
    m = re.match(r"argument (\S+?)(?:/\S+)?: invalid (float|int) value: '(.*)'$", message)
    if m:
        kind = "a number" if m.group(2) == "float" else "a whole number"
        return f"{m.group(1)} needs {kind}, not '{m.group(3)}'"
    m = re.match(r"argument (\S+?)(?:/\S+)?: invalid choice: '(.*?)' \(choose from (.*)\)$", message)
    if m:
        flag, value, choices = m.group(1), m.group(2), [c.strip(" '") for c in m.group(3).split(",")]
        close = difflib.get_close_matches(value, choices, n=1)
        if flag == "COMMAND":
            if os.path.exists(value):
                return f"unknown command '{value}' (did you mean glmv ask {value}?)"
            hint = f"did you mean {close[0]}? " if close else ""
            return f"unknown command '{value}' ({hint}commands: {', '.join(choices)})"
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{flag} '{value}' is not one of {', '.join(choices)}{hint}"
    m = re.match(r"argument (\S+?)(?:/\S+)?: expected one argument$", message)
    if m:
        return f"{m.group(1)} needs a value {help_hint}"
    m = re.match(r"the following arguments are required: (.*)$", message)
    if m:
        return f"{parser.prog} needs {m.group(1)} {help_hint}"
    return f"{message} {help_hint}"


def _unknown_arguments_error(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """``unknown option --max-tokens for glmv ask (did you mean --max-new-tokens?)``."""
    flag = next((e for e in extras if e.startswith("-") and e != "-"), None)
    if flag is None:
        return f"unexpected argument '{extras[0]}' for {parser.prog} ({parser.prog} --help lists what it takes)"
    name = flag.split("=", 1)[0]
    options = [o for o in parser._option_string_actions if o.startswith("--")]
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if not close:  # a flag's words in another order or partly: --tokens-max, --new-tokens
        words = set(name.strip("-").split("-"))
        close = [o for o in options if words and words <= set(o.strip("-").split("-"))][:1]
    hint = f"did you mean {close[0]}?" if close else f"{parser.prog} --help lists the options"
    return f"unknown option {name} for {parser.prog} ({hint})"


def _given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The ``dest`` of every option written on the command line (to refuse flags a command would ignore)."""
    actions = parser._option_string_actions
    found: set[str] = set()
    for token in argv:
        if token == "--":
            break
        if not token.startswith("-") or token == "-":
            continue
        name = token.split("=", 1)[0]
        action = actions.get(name)
        if action is None and name.startswith("--"):  # argparse takes unambiguous prefixes
            hits = {id(a): a for opt, a in actions.items() if opt.startswith(name)}
            action = next(iter(hits.values())) if len(hits) == 1 else None
        if action is not None:
            found.add(action.dest)
    return found


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, refusing unknown options with a suggestion; records which options were given in ``args.given``."""
    args, extras = parser.parse_known_args(argv)
    sub = getattr(parser, "commands", {}).get(getattr(args, "command", None), parser)
    if extras:
        raise UsageError(_unknown_arguments_error(extras, sub))
    args.given = _given_options(sub, argv)
    for dest in _TEXT_OPTIONS:
        _check_utf8(_flag(dest), getattr(args, dest, None))
    return args


_TEXT_OPTIONS = ("prompt", "system", "query")  # text sent to the model or the history, never a file name


def _check_utf8(flag: str, text: str | None) -> None:
    """A byte that is not UTF-8 (a Latin-1 terminal's 'é') reaches Python as a lone surrogate, which no JSON
    request, tokenizer or history can carry: say so, instead of an unexpected UnicodeEncodeError later."""
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = os.fsencode(exc.object[exc.start:exc.end])
        raise UsageError(f"{flag} is not UTF-8 text (byte 0x{byte.hex()} at character {exc.start + 1}): set your "
                         f"terminal to UTF-8 or pass the text in UTF-8") from None


# Flags that several commands take, each declared once: add_flags(group, "debug", "max_pixels", ...). A command
# may say more in its help (help=...), but the name, type and default are the same everywhere.
JSON_HELP = "print the result as one JSON object on stdout (and nothing else there; messages go to stderr)"
COMMON_FLAGS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "debug": (("--debug",), dict(action="store_true", help="show tracebacks")),
    "json": (("--json",), dict(action="store_true", help=JSON_HELP)),
    "max_pixels": (("--max-pixels",), dict(
        type=int, default=None, metavar="N",
        help=f"scale images down to at most N pixels (fewer visual tokens, faster; default {DEFAULT_MAX_PIXELS})")),
    "thinking": (("--thinking",), dict(action=argparse.BooleanOptionalAction, default=True,
                                       help="let the model reason before answering (--no-thinking is faster)")),
    "max_new_tokens": (("--max-new-tokens",), dict(type=int, default=None, metavar="N",
                                                   help=f"answer length cap (default {DEFAULT_MAX_NEW_TOKENS})")),
    "out": (("--out",), dict(default=DEFAULT_HTML_DIR, metavar="DIR",
                             help=f"folder for generated pages, generated_YYYYMMDD_HHMMSS.html "
                                  f"(default: {DEFAULT_HTML_DIR})")),
}


def add_flags(group: Any, *names: str, **changes: Any) -> None:
    """Add the shared flags ``names`` to a parser or group; ``changes`` (help=..., required=...) apply to each."""
    for name in names:
        options, spec = COMMON_FLAGS[name]
        group.add_argument(*options, **{**spec, **changes})


def _sampling_help(name: str, what: str) -> str:
    """``what``, then the range from SAMPLING_BOUNDS and the model card's default (the checkpoint's own wins)."""
    return f"{what}, {SAMPLING_BOUNDS[name].rule} (default {getattr(SamplingParams(), name)}, or the checkpoint's own)"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "--model_path", dest="model", metavar="ID_OR_PATH",
                   help="hub id or local folder (default: $GLMV_MODEL or zai-org/GLM-4.6V-Flash); 'tiny' = tiny random test model")
    g.add_argument("--int4", dest="quant", action="store_const", const="nf4",
                   help="the tutorial's 4-bit: bitsandbytes nf4, double quantization, bf16 compute (needs CUDA)")
    g.add_argument("--quant", choices=["none", "nf4", "w4"], default=None,
                   help="weights: none (bf16), nf4 (= --int4), w4 (glmv's fast 4-bit: int4 with Triton kernels; "
                        "fits a 10 GB card and decodes faster than bf16)")
    g.add_argument("--engine", choices=["auto", "fast", "hf"], default=None,
                   help="decoder: fast (static cache, Triton kernels, CUDA graphs; default on CUDA) or hf (transformers generate)")
    g.add_argument("--speculate", choices=["auto", "on", "off"], default=None,
                   help="fast engine: prompt-lookup speculative decoding (auto: on when the prompt carries text to copy, "
                        "as HTML edits, refine rounds and OCR re-runs do)")
    g.add_argument("--prefix-cache-gb", type=float, default=None, metavar="GB",
                   help="fast engine: memory for cached prompt prefixes (default: half the free GPU memory, "
                        "at most 16; 0 = off)")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default=None,
                   help="weights dtype (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: auto)")


class _OlderSpelling(argparse.Action):
    """Stores like the flag it is an older name of, and remembers the name used: errors quote what was typed."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.spelled = {**getattr(namespace, "spelled", {}), self.dest: option_string}


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("remote backend (any OpenAI-compatible server: vLLM, SGLang, another glmv serve)")
    g.add_argument("--backend", choices=["local", "openai"], default="local", help="where the model runs (default: local)")
    g.add_argument("--base-url", default=None, help="the server's API root, e.g. http://gpu-box:8000/v1")
    g.add_argument("--remote-api-key", default=None, metavar="KEY",
                   help="the key glmv sends to --base-url (default: $OPENAI_API_KEY)")
    g.add_argument("--api-key", dest="remote_api_key", action=_OlderSpelling,  # the older spelling, still taken
                   help=argparse.SUPPRESS)
    g.add_argument("--remote-model", default=None, help="model name on the server (default: the first it lists)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they come (default: on when stdout is a terminal)")
    add_flags(g, "thinking")
    g.add_argument("--show-thinking", action="store_true", help="print the model's reasoning, marked, before the answer")
    add_flags(g, "max_new_tokens")
    g.add_argument("--temperature", type=float, default=None,
                   help=_sampling_help("temperature", "sampling temperature (0 = greedy)"))
    g.add_argument("--top-p", type=float, default=None, help=_sampling_help("top_p", "nucleus sampling"))
    g.add_argument("--top-k", type=int, default=None, help=_sampling_help("top_k", "top-k sampling"))
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help=_sampling_help("repetition_penalty", "penalty on repeats"))
    g.add_argument("--seed", type=int, default=None,
                   help=f"random seed for reproducible sampling, {SAMPLING_BOUNDS['seed'].rule}")
    add_flags(g, "max_pixels")
    g.add_argument("--system", default=None, help="system prompt")
    g.add_argument("--pages", default=None, metavar="RANGE", help="PDF/deck pages, e.g. 1-5,9 (default: all)")
    g.add_argument("--pdf-long-side", type=int, default=DEFAULT_LONG_SIDE, metavar="PX",
                   help=f"render PDF pages with this many pixels on the longer side (default {DEFAULT_LONG_SIDE})")
    g.add_argument("--dpi", type=float, default=None, help="render PDF pages at this dpi instead of --pdf-long-side")
    add_flags(g, "json", help="print one JSON object (answer, thinking, usage, timings) on stdout instead of text")
    g.add_argument("--tools", action="store_true",
                   help="let the model call tools (crop/zoom into the images, render HTML and look at it)")
    g.add_argument("--max-steps", type=int, default=tasks.MAX_TOOL_STEPS,
                   help=f"at most this many tool rounds (default {tasks.MAX_TOOL_STEPS})")
    add_flags(g, "debug")


def _add_session_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resident model and history")
    g.add_argument("--no-server", action="store_true",
                   help="load the model in this process even when `glmv start` keeps a matching one loaded")
    g.add_argument("--no-log", action="store_true", help="leave this out of the history (glmv logs)")
    g.add_argument("--json-out", default=None, metavar="FILE", help="write the --json object to FILE too (with or without --json)")


def _add_conversation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--continue", dest="cont", action="store_true", help="continue the last conversation")
    p.add_argument("--cid", default=None, metavar="ID", help="continue conversation ID (see glmv logs)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgParser(
        prog="glmv",
        description="Run the GLM-4.6V vision-language models: describe images, read text, turn screenshots into HTML.",
        epilog="With no command, glmv describes input/image_1.png like the original tutorial "
               "(glmv --input IMAGE --prompt TEXT picks another). "
               "glmv start keeps a model loaded, so later commands answer in about a second.",
    )
    parser.add_argument("--version", action="version", version=f"glmv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ask = sub.add_parser("ask", help="answer a prompt about zero or more images")
    ask.add_argument("images", nargs="*", metavar="IMAGE", help="path, http(s) URL, data: URI or - for stdin")
    ask.add_argument("-p", "--prompt", default=None, help="what to ask (default: 'describe this image')")
    _add_conversation_args(ask)

    ocr = sub.add_parser("ocr", help=TASKS["ocr"].help)
    ocr.add_argument("images", nargs="*", metavar="IMAGE")
    ocr.add_argument("-p", "--prompt", default=None, help="override the OCR prompt")

    html = sub.add_parser("html", help=TASKS["html"].help)
    html.add_argument("images", nargs="*", metavar="IMAGE")
    html.add_argument("-p", "--prompt", default=None, help="override the image-to-HTML prompt")
    add_flags(html, "out")
    html.add_argument("--refine", type=int, default=0, metavar="N",
                      help="up to N rounds of: render the page, show it to the model beside the screenshot, correct it "
                           "(stops early when the visual score stops improving)")

    score = sub.add_parser("score", help="visual similarity of a page's render to a target screenshot (JSON)")
    score.add_argument("target", help="the target screenshot (PNG/JPEG)")
    score.add_argument("page", help="the HTML file")
    add_flags(score, "debug")

    chat = sub.add_parser("chat", help="talk about images, turn by turn (/image PATH, /thinking on|off, /save, /help)")
    chat.add_argument("images", nargs="*", metavar="IMAGE", help="images for the first question")
    _add_conversation_args(chat)

    for p in (ask, ocr, html, chat):
        p.add_argument("--input", action="append", default=[], metavar="IMAGE", help="an image (tutorial flag; repeatable)")
        _add_model_args(p)
        _add_backend_args(p)
        _add_generation_args(p)
        add_limit_arguments(p)
        _add_session_args(p)

    batch = sub.add_parser("batch", help="run a task over files, folders, PDFs and decks; resumable")
    batch.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders (recursive)")
    batch.add_argument("--task", choices=[*TASKS, "ask"], default="ocr")  # a preset added to TASKS is a choice
    batch.add_argument("-p", "--prompt", default=None, help="the prompt (required for --task ask)")
    add_flags(batch, "out", required=True, default=None, help="output folder (results, manifest.jsonl)")
    batch.add_argument("--format", choices=["md", "json", "both"], default="md")
    batch.add_argument("--batch-size", type=int, default=4, help="items in flight at once (batched by the engine)")
    batch.add_argument("--retry-failed", action="store_true", help="retry items that failed in an earlier run")
    batch.add_argument("--max-doc-pages", type=int, default=2000,
                       help="a PDF or deck with more pages to read fails with a message (default 2000)")
    _add_model_args(batch)
    _add_backend_args(batch)
    _add_generation_args(batch)
    _add_session_args(batch)

    ui = sub.add_parser("ui", help="the web app (Gradio) on http://127.0.0.1:7860")
    _add_model_args(ui)
    _add_backend_args(ui)
    g = ui.add_argument_group("web app")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=7860)
    add_flags(g, "out", "max_pixels")
    g.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="requests sent to the model at once; others wait in line (default: 1 local, 8 --backend openai)")
    add_flags(g, "debug")

    _add_ground_parser(sub)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions)")
    _add_model_args(serve)
    g = serve.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="the key clients must send, as 'Authorization: Bearer KEY' (default: $GLMV_API_KEY; "
                        "the key glmv itself sends to a remote server is --remote-api-key)")
    g.add_argument("--served-model-name", default=None, help="model name in the API (default: the --model value)")
    g.add_argument("--allowed-media-dir", default=None, metavar="DIR", help="let requests name local image files inside DIR")
    g.add_argument("--allow-remote-media", action="store_true", help="let requests name http(s) image URLs (the server fetches them)")
    g.add_argument("--max-queue", type=int, default=64, help="requests admitted at once; more get 429 (default 64)")
    g.add_argument("--max-batch", type=int, default=8, help="requests batched into one generation (default 8)")
    add_flags(g, "max_pixels")
    g.add_argument("--max-body-mb", type=int, default=64, help="largest request body accepted; more gets 413 (default 64)")
    g.add_argument("--idle-timeout", default=None, metavar="DURATION", help="stop after this long without requests (90s, 30m, 2h)")
    g.add_argument("--state-file", default=None, help=argparse.SUPPRESS)  # glmv start: where to record this server
    add_flags(g, "debug")
    add_limit_arguments(serve)

    start = sub.add_parser("start", help="keep a model loaded in the background; ask/ocr/html/chat/batch then use it")
    _add_model_args(start)
    g = start.add_argument_group("resident server")
    g.add_argument("--idle-timeout", default="30m", metavar="DURATION",
                   help="stop after this long without requests: 90s, 30m, 2h, or 0 for never (default 30m)")
    add_flags(g, "max_pixels")
    add_flags(g, "json", help="print the server's record as one JSON object on stdout")
    add_flags(g, "debug")
    stop = sub.add_parser("stop", help="stop the background model(s) started by glmv start")
    stop.add_argument("--model", default=None, metavar="ID_OR_PATH", help="stop only this model (default: all)")
    add_flags(stop, "json", help="print what was stopped as one JSON object on stdout: {\"stopped\": [...]}")
    add_flags(stop, "debug")
    ps = sub.add_parser("ps", help="list the background models")
    add_flags(ps, "json", help="print the list as one JSON object on stdout: {\"servers\": [...]}")
    add_flags(ps, "debug")

    logs = sub.add_parser("logs", help="the history of prompts and answers (SQLite); glmv logs off|on|status|path")
    logs.add_argument("action", nargs="?", choices=["list", "on", "off", "status", "path"], default="list",
                      help="list (default); off / on: stop / resume logging; status; path of the database")
    logs.add_argument("-n", type=int, default=3, metavar="N", help="the N latest answers (default 3; 0 = all)")
    logs.add_argument("-q", "--query", default=None, metavar="TEXT", help="only answers whose prompt or answer contains TEXT")
    logs.add_argument("--cid", default=None, metavar="ID", help="only conversation ID")
    add_flags(logs, "json", help="print one JSON object on stdout: {\"entries\": [...]} (status: the state; "
                                 "path: {\"path\": ...})")
    add_flags(logs, "debug")
    from .bench_options import DESCRIPTION, add_bench_arguments

    bench = sub.add_parser("bench", help="speed against the GPU's bandwidth limit, or the server under load (--serve)",
                           description=DESCRIPTION)
    add_bench_arguments(bench)
    add_flags(bench, "debug")
    parser.commands = sub.choices  # type: ignore[attr-defined]
    return parser


def _is_tutorial_form(argv: list[str]) -> bool:
    """``glmv`` alone or ``glmv --prompt X ...`` without a command: the tutorial's script."""
    return not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"))


def _normalize_argv(argv: list[str]) -> list[str]:
    """Bare ``glmv`` and the tutorial's ``glmv --input x --prompt y`` mean ``glmv ask ...``."""
    if not argv:
        return ["ask"]
    if argv[0] in ("-h", "--help", "--version") or not argv[0].startswith("-"):
        return argv
    return ["ask", *argv]


# -- helpers -------------------------------------------------------------------------------------
class Printer:
    """Writes streamed thinking/answer text to stdout, with visible markers around the reasoning."""

    def __init__(self, out: TextIO, err: TextIO, show_thinking: bool) -> None:
        self.out, self.err = out, err
        self.show_thinking = show_thinking
        self.tty = out.isatty()
        self._section: str | None = None
        self._announced_thinking = False

    def _style(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.tty else text

    def write(self, part: str, text: str) -> None:
        if part == "thinking":
            if not self.show_thinking:
                if not self._announced_thinking and self.err.isatty():
                    self.err.write("glmv: thinking ...\n")
                    self.err.flush()
                self._announced_thinking = True
                return
            if self._section != "thinking":
                self.out.write(self._style("── thinking ──", "2;36") + "\n")
                self._section = "thinking"
            self.out.write(self._style(text, "2"))
        else:
            if self._section == "thinking":
                self.out.write("\n" + self._style("── answer ──", "2;36") + "\n")
            self._section = "answer"
            self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        if self._section is not None:
            self.out.write("\n")
            self.out.flush()


def summary_line(result: Result) -> str:
    line = tasks.stats_line(result.usage, result.timings)
    if result.finish_reason != "stop":
        line += f", finish: {result.finish_reason}"
    return "glmv: " + line


def _sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }
    SamplingParams().merged(**overrides)  # validate now, before anything is loaded
    return overrides


# The flags that map onto Settings fields (same names); a command without one of them leaves the default.
SETTINGS_FLAGS = ("model", "device", "dtype", "quant", "engine", "speculate", "prefix_cache_gb", "max_pixels", "thinking")
MODEL_COMMANDS = (*SUBCOMMANDS, "chat", "start", "serve", "ui", "ground", "batch")  # the commands that take Settings


def _settings_from_args(args: argparse.Namespace) -> Settings:
    """The one way a command turns its flags into Settings: defaults, then GLMV_* variables, then the flags given."""
    return Settings.from_env(**{name: getattr(args, name, None) for name in SETTINGS_FLAGS})


def _default_backend(settings: Settings) -> Backend:
    from .backends.local import LocalBackend

    return LocalBackend(settings).load()


def _local_backend(stderr: TextIO) -> BackendFactory:
    """The model in this process; says so at once, since torch and transformers take seconds to import."""

    def factory(settings: Settings) -> Backend:
        stderr.write(f"glmv: loading {settings.model}… (glmv start --model {settings.model} keeps it loaded between commands)\n")
        stderr.flush()
        return _default_backend(settings)

    return factory


def _remote_backend(args: argparse.Namespace, stderr: TextIO | None = None) -> BackendFactory:
    if not args.base_url:
        raise GlmvError("--backend openai needs --base-url (for example http://localhost:8000/v1)")

    def factory(settings: Settings) -> Backend:
        from .backends.remote import RemoteBackend

        key = args.remote_api_key or os.environ.get("OPENAI_API_KEY")
        backend = RemoteBackend(args.base_url, model=args.remote_model, api_key=key).load()
        if stderr is not None:
            stderr.write(f"glmv: using {backend.model} at {backend.shown_url}\n")
        return backend

    return factory


def _resident_backend(resident: Any) -> Backend:
    """A resident ``glmv serve``, through the standard-library client (no openai, pydantic or torch imports)."""
    from .backends import lite
    from .backends.remote import RemoteBackend

    sampling = SamplingParams().merged(**resident.sampling) if resident.sampling else None
    return RemoteBackend(resident.base_url, model=resident.model, api_key=resident.api_key, sampling=sampling,
                         client_module=lite)


def _choose_backend(args: argparse.Namespace, settings: Settings, injected: BackendFactory | None,
                    stderr: TextIO) -> tuple[BackendFactory, str]:
    """Where the model runs: "openai" (--backend openai), "resident" (a matching `glmv start`) or "local"."""
    if args.backend == "openai":
        return _remote_backend(args, stderr), "openai"
    if injected is not None:
        return injected, "local"
    if not args.no_server and os.environ.get("GLMV_NO_SERVER", "").strip().lower() in ("", "0", "false", "no"):
        from .resident import MATCH_FIELDS, find_resident

        explicit = {f: getattr(args, f, None) for f in MATCH_FIELDS if getattr(args, f, None) is not None}
        found, why = find_resident(settings.model, explicit)
        if found is not None:
            stderr.write(f"glmv: using the resident {found.model} (pid {found.pid}, port {found.port}; "
                         f"--no-server loads it in this process instead)\n")
            return (lambda s: _resident_backend(found)), "resident"
        if why:
            stderr.write(f"glmv: {why}\n")
    return _local_backend(stderr), "local"


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _refuse_ignored(args: argparse.Namespace) -> None:
    """Flags that would silently do nothing here are errors (and --base-url alone means --backend openai)."""
    given: set[str] = getattr(args, "given", set())
    if "base_url" in given and "backend" not in given:
        args.backend = "openai"
    if args.backend == "openai":
        for dest in MODEL_FLAGS:
            if dest in given:
                extra = "; --remote-model NAME picks one of its models" if dest == "model" else ""
                raise UsageError(f"{_flag(dest)} has no effect with --backend openai: the server runs the model as it "
                                 f"was started{extra}")
        if "no_server" in given:
            raise UsageError("--no-server has no effect with --backend openai")
    else:
        for dest in ("base_url", "remote_api_key", "remote_model"):
            if dest in given:
                flag = getattr(args, "spelled", {}).get(dest) or _flag(dest)
                raise UsageError(f"{flag} needs --backend openai --base-url URL")
    if "max_steps" in given and not args.tools:
        raise UsageError("--max-steps has no effect without --tools")
    if getattr(args, "refine", 0) < 0:  # was silently no refinement
        raise UsageError(f"--refine {args.refine}: give the number of rounds, 1 or more (0, the default, is none)")
    if "show_thinking" in given and not args.thinking:
        raise UsageError("--show-thinking shows nothing with --no-thinking: drop one of them")
    if args.json and args.stream:
        raise UsageError("--stream and --json do not mix: --json prints one object when the answer is complete")
    _check_json_out(args)
    unused = {"batch": ("stream", "show_thinking", "system", "tools", "max_steps"), "chat": ("json", "json_out", "stream", "tools", "max_steps")}
    for dest in unused.get(args.command, ()):
        if dest in given:
            raise UsageError(f"glmv {args.command} does not use {_flag(dest)}")


def _may_be_document(source: str) -> bool:
    """Could ``source`` be a PDF or deck? (unknown sources, like stdin or URLs, could)"""
    from .documents import kind_of, sniff_kind

    if source == "-" or source.startswith(("data:", "http://", "https://")):
        return True
    path = Path(source).expanduser()
    kind = kind_of(path)
    if kind == "unknown" and path.is_file():
        with open(path, "rb") as f:
            kind = sniff_kind(f.read(16)) or "image"
    return kind in ("pdf", "office")


def _check_document_flags(args: argparse.Namespace, sources: list[str]) -> None:
    given = [d for d in ("pages", "pdf_long_side", "dpi") if d in getattr(args, "given", set())]
    if given and not any(_may_be_document(s) for s in sources):
        what = f"'{sources[0]}' is not a PDF or slide deck" if sources else "there is no document"
        raise UsageError(f"{_flag(given[0])} applies to PDFs and slide decks, and {what}")


def _default_image() -> str:
    if not Path(DEFAULT_IMAGE).is_file():
        raise UsageError(f"no image given, and the tutorial's default image {DEFAULT_IMAGE} is not in this folder: "
                         f"pass one (glmv ask photo.jpg -p 'describe this image'), or run glmv in the glmv checkout")
    return DEFAULT_IMAGE


def _logging(args: argparse.Namespace) -> bool:
    from . import history

    return not getattr(args, "no_log", False) and history.enabled()


def _conversation(args: argparse.Namespace, stderr: TextIO, max_pixels: int, budget: Budget | None = None,
                  allow_remote: bool = True) -> tuple[str | None, list[Message]]:
    """-c / --cid: the conversation's id and its earlier turns (inputs loaded again from their paths).

    The earlier turns are sent again, so they count against ``budget`` (the command's own, or a fresh one) as
    a fresh request's inputs would: their text, then each input measured before it is decoded."""
    if not (args.cont or args.cid):
        return None, []
    from . import history
    from .documents import load_inputs

    if args.cont and args.cid:
        raise UsageError("-c continues the last conversation and --cid a given one: use one of them")
    if not history.enabled():
        raise UsageError("continuing needs the history, which is off (glmv logs on turns it back on)")
    with history.History() as h:
        cid = args.cid or h.last_conversation_id()
        entries = h.conversation(cid) if cid else []
    if not entries:
        raise UsageError(f"no conversation {cid} in the history (glmv logs lists them)" if args.cid
                         else "there is no earlier conversation to continue: ask without -c first")

    budget = budget or Budget(limits_from_args(args))
    budget.add_text(sum(len(e.prompt) + len(e.answer) + len(e.system or "") for e in entries))

    def load(source: str, pages: str | None) -> list[Any]:
        return load_inputs(source, pages=pages, max_pixels=max_pixels, budget=budget, allow_remote=allow_remote)

    def warn(line: str) -> None:
        stderr.write(f"glmv: warning: {line}\n")

    return cid, history.replay(entries, load, warn)


def _log_answer(args: argparse.Namespace, conversation_id: str | None, model: str, where: str, prompt: str,
                sources: list[str], payload: dict[str, Any], sampling: SamplingParams, stderr: TextIO) -> str | None:
    """Add the answer to the history; returns its conversation id (None when logging is off or failed).

    The answer is already computed (and maybe printed): a history that cannot be written (corrupt, locked,
    disk full) is a warning, never an error that would lose the answer or its JSON."""
    if not _logging(args):
        return None
    from . import history

    settings = {"sampling": {k: v for k, v in sampling.__dict__.items() if k != "stop"}, "thinking": args.thinking,
                "pages": getattr(args, "pages", None), "max_pixels": args.max_pixels, "tools": getattr(args, "tools", False)}
    try:
        cid = history.record(conversation_id=conversation_id, command=args.command, model=model, backend=where,
                             prompt=prompt, system=args.system, sources=sources, payload=payload, settings=settings)
    except GlmvError as exc:
        stderr.write(f"glmv: warning: this answer was not logged: {exc}\n")
        return None
    return cid


# -- commands ------------------------------------------------------------------------------------
def run_task(
    args: argparse.Namespace,
    settings: Settings,
    backend_factory: BackendFactory | None,
    stdout: TextIO,
    stderr: TextIO,
) -> int:
    task = args.command
    sampling_overrides = _sampling_from_args(args)
    _refuse_ignored(args)
    sources = [*args.images, *args.input]
    prompt = args.prompt
    continuing = task == "ask" and (args.cont or args.cid)
    if continuing and prompt is None:
        raise UsageError("continuing a conversation needs a prompt: glmv ask -c -p 'and then?'")
    if task == "ask":
        # glmv alone, or the tutorial's `glmv --prompt X`, describes the tutorial's image; `glmv ask -p X` is text only
        if not sources and not continuing and (prompt is None or getattr(args, "tutorial", False)):
            sources = [_default_image()]
        if prompt is None:
            prompt = TASKS["describe"].prompt
    else:
        if not sources:
            raise GlmvError(f"glmv {task} needs an image: glmv {task} IMAGE")
        if task == "html" and len(sources) > 1:
            raise GlmvError("glmv html takes one screenshot; run it once per image")
        if prompt is None:
            prompt = TASKS[task].prompt
    if not prompt.strip():
        raise GlmvError("the prompt is empty: say what you want to know (for example -p 'describe this image')")
    if sources.count("-") > 1:
        raise GlmvError("standard input ('-') can be read only once")
    _check_document_flags(args, sources)
    # Everything is measured (headers, page counts) and checked against the limits before anything is decoded,
    # the earlier turns of a continued conversation included.
    budget = Budget(limits_from_args(args), separate_prompts=task == "ocr")
    budget.add_text(len(prompt) + len(args.system or ""))
    conversation_id, prior = (_conversation(args, stderr, settings.max_pixels, budget, settings.allow_remote_media)
                              if task == "ask" else (None, []))
    from .documents import RenderOptions, load_all

    render = RenderOptions(args.pages, args.pdf_long_side, args.dpi, settings.max_pixels)
    media = load_all(sources, render, budget=budget, allow_remote=settings.allow_remote_media)
    if task == "html":
        from .outputs import ensure_writable_dir

        ensure_writable_dir(Path(args.out))

    backend_factory, where = _choose_backend(args, settings, backend_factory, stderr)
    backend = backend_factory(settings)
    model_name = backend.model if where == "openai" else settings.model  # the name the server reports
    defaults = backend.default_sampling
    sampling = defaults.merged(**sampling_overrides)
    stream = args.stream if args.stream is not None else (stdout.isatty() and not args.json)
    if args.json:
        stream = False

    before: list[Message] = [m for m in prior if not (args.system and m.role == "system")]
    if args.system:
        before.insert(0, Message("system", [args.system]))
    if args.tools and args.max_steps < 1:
        raise GlmvError("--max-steps must be at least 1")
    cancel = threading.Event()
    common: dict[str, Any] = {"thinking": args.thinking, "cancel": cancel, "max_steps": args.max_steps,
                              "tools": default_registry() if args.tools else None}
    if task == "ocr":  # one page (or image) per prompt; other tasks put everything in one prompt
        events = tasks.ocr(backend, media, sampling, prompt=prompt, before=before, **common)
    elif task == "html":
        events = tasks.html(backend, [*before, user_message(prompt, media)], sampling, Path(args.out), **common)
    else:
        events = tasks.ask(backend, [*before, user_message(prompt, media)], sampling, **common)

    results: list[tuple[Any, Result]] = []
    group, saved, refine_versions = media, None, []
    try:
        for event in _follow(events, stream, args.show_thinking, stdout, stderr):
            if isinstance(event, tasks.PageStarted):
                group = [media[event.index]]
                if event.count > 1 and not args.json:
                    stdout.write(f"\n<!-- {group[0].source} -->\n\n" if results else f"<!-- {group[0].source} -->\n\n")
            elif isinstance(event, tasks.Finished):
                result = event.result
                images = [m for m in group if hasattr(m, "original_size")]
                if len(images) == 1:  # grounding boxes in the input file's pixels (boxes are on a 0-1000 scale)
                    result.output.with_image_size(*images[0].original_size)
                results.append((group, result))
                if not args.json:
                    if not stream:
                        printer = Printer(stdout, stderr, args.show_thinking)
                        if result.output.thinking:
                            printer.write("thinking", result.output.thinking)
                        printer.write("answer", result.output.answer)
                        printer.end()
                    stderr.write(summary_line(result) + "\n")
            elif isinstance(event, tasks.Saved):
                saved = event
                if not event.html_found:
                    stderr.write("glmv: warning: the answer contained no HTML; saved the answer as text in a page\n")
        if saved is not None and args.refine > 0:
            if not saved.html_found:
                stderr.write("glmv: warning: no HTML to refine\n")
            else:
                from .media import LoadedImage

                target = next(m for m in media if isinstance(m, LoadedImage))
                refine_versions = refine_html(backend, target, saved.page, saved.path, args.refine, sampling,
                                              args.thinking, Path(args.out), stderr, cancel)
    except KeyboardInterrupt:
        cancel.set()
        stderr.write("\nglmv: cancelled\n")
        return 130

    html_path = None
    result = results[-1][1]
    if saved is not None:
        html_path = saved.path
        if refine_versions:
            html_path = max(refine_versions, key=lambda v: v["score"])["path"]
        if not args.json:
            stdout.write(f"{html_path}\n")

    if len(results) == 1:
        payload = {"model": model_name, "task": task, **result.to_dict()}
    else:
        pages = [{"source": g[0].source, **r.to_dict()} for g, r in results]
        payload = {"model": model_name, "task": task, "pages": pages,
                   "answer": "\n\n".join(p["answer"] for p in pages),
                   "thinking": "\n\n".join(p["thinking"] for p in pages if p["thinking"]),
                   "finish_reason": result.finish_reason, "timings": {"total_s": round(sum(p["timings"]["total_s"] for p in pages), 4)},
                   "usage": {k: sum(p["usage"][k] for p in pages) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
    conversation_id = _log_answer(args, conversation_id, model_name, where, prompt, sources, payload, sampling,
                                  stderr)
    if conversation_id:
        payload["conversation_id"] = conversation_id
    if task == "html":
        payload["html_path"] = str(html_path)
        payload["html_found"] = result.output.html is not None
        if refine_versions:
            payload["versions"] = refine_versions
    _emit_json(args, payload, stdout)
    stdout.flush()
    return 0


def _emit_json(args: argparse.Namespace, payload: dict[str, Any], stdout: TextIO) -> None:
    """--json: the object on stdout; --json-out FILE: the same object in FILE (written atomically)."""
    text = json.dumps(payload, ensure_ascii=False)
    if args.json:
        stdout.write(text + "\n")
    if getattr(args, "json_out", None):
        from .outputs import write_atomic

        try:
            write_atomic(Path(args.json_out), text + "\n")
        except OSError as exc:  # a full disk or quota (the target itself was checked before the work)
            raise GlmvError(f"cannot write --json-out '{args.json_out}': {exc.strerror or exc}") from None


def _check_json_out(args: argparse.Namespace) -> None:
    """A --json-out file that cannot be written is refused before any work."""
    if getattr(args, "json_out", None):
        from .outputs import ensure_writable_dir

        target = Path(args.json_out)
        if target.is_dir():
            raise UsageError(f"--json-out '{args.json_out}' is a folder; give a file name")
        ensure_writable_dir(target.parent if str(target.parent) else Path("."))


def _follow(events: Iterator[tasks.Event], stream: bool, show_thinking: bool, stdout: TextIO,
            stderr: TextIO) -> Iterator[tasks.Event]:
    """Show a task's progress as it comes (its text when streaming, each tool step, status lines) and pass
    its events on."""
    printer = None
    for event in events:
        if isinstance(event, Chunk):
            if stream and event.type in ("thinking", "answer"):
                printer = printer or Printer(stdout, stderr, show_thinking)
                printer.write(event.type, event.text)
            elif stream and event.type == "status":
                stderr.write(f"glmv: {event.text}\n")
        elif isinstance(event, tasks.ToolStep):
            if printer is not None:
                printer.end()
            stderr.write(f"glmv: {event.step.line()}\n")
            stderr.flush()
        elif isinstance(event, tasks.Finished) and printer is not None:
            printer.end()
            printer = None  # the next page (OCR) starts its own sections
        yield event


# -- glmv ground: find things in an image, draw the model's boxes, print them ------------------------------
def _add_ground_parser(sub: Any) -> None:
    g = sub.add_parser("ground", help="find things in an image: draw the model's boxes on it, print them as JSON")
    g.add_argument("image", metavar="IMAGE", help="path, http(s) URL, data: URI or - for stdin")
    g.add_argument("-p", "--prompt", required=True, metavar="WHAT", help="what to find, e.g. \"the red car\"")
    g.add_argument("-o", "--out", default=None, metavar="PNG",
                   help="where to write the image with the boxes (default: IMAGE's name + _boxes.png, here)")
    add_flags(g, "thinking", "max_new_tokens", "max_pixels", "debug")
    _add_model_args(g)
    _add_backend_args(g)


def run_ground(args: argparse.Namespace, settings: Settings, backend_factory: BackendFactory, stdout: TextIO,
               stderr: TextIO) -> int:
    import urllib.parse

    from .grounding import annotate, find_prompt
    from .media import load_image
    from .outputs import ensure_writable_dir

    what = args.prompt.strip()
    if not what:
        raise GlmvError('the prompt is empty: say what to find, for example -p "the red car"')
    sampling = SamplingParams().merged(max_new_tokens=args.max_new_tokens)
    image = load_image(args.image, max_pixels=settings.max_pixels)
    src = args.image
    stem = "" if src == "-" or src.startswith("data:") else Path(urllib.parse.urlsplit(src).path).stem
    out = Path(args.out) if args.out else Path(f"{stem or 'image'}_boxes.png")
    if out.suffix.lower() != ".png":
        raise GlmvError(f"--out '{out}': the annotated image is a PNG; give a name ending in .png")
    ensure_writable_dir(out.parent if str(out.parent) else Path("."))
    if getattr(args, "backend", "local") == "openai":
        backend_factory = _remote_backend(args)
    backend = backend_factory(settings)
    defaults = backend.default_sampling
    try:
        result = tasks.finish(tasks.ask(backend, [user_message(find_prompt(what), [image])],
                                        defaults.merged(max_new_tokens=sampling.max_new_tokens),
                                        thinking=args.thinking)).result
    finally:
        backend.close()
    found = annotate(image, result.output.answer, what)  # drawn and reported in the file's own pixels
    report = {**found.report(), "answer": result.output.answer}
    if found.save(out):
        report["image"] = str(out)
    stderr.write(f"glmv: {found.note}" + (f" -> {out}\n" if found.boxes else "; no image written\n"))
    stdout.write(json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    return 0


def run_score(args: argparse.Namespace, stdout: TextIO) -> int:
    from .score import score_page

    page = Path(args.page)
    if not page.is_file():
        raise GlmvError(f"cannot read page '{args.page}': no such file")
    report, _ = score_page(Path(args.target), page.read_text(encoding="utf-8", errors="replace"))
    stdout.write(json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    return 0


def refine_html(backend: Backend, target_image: Any, first_html: str, first_path: Path, rounds: int,
                sampling: SamplingParams, thinking: bool, out_dir: Path, stderr: TextIO,
                cancel: threading.Event | None = None) -> list[dict[str, Any]]:
    """Run the refine task, one line per scored version; the versions as {version, path, score}."""
    versions = []
    for event in tasks.refine(backend, target_image, first_html, first_path, rounds, sampling, thinking=thinking,
                              out_dir=out_dir, cancel=cancel):
        if isinstance(event, tasks.RoundFinished):
            versions.append({"version": event.version, "path": str(event.path), "score": event.score})
            stderr.write(f"glmv: version {event.version}: overall {event.score:.3f} -> {event.path}\n")
        elif isinstance(event, tasks.RefineStopped) and event.reason:
            stderr.write(f"glmv: {event.reason}\n")
    return versions


MAX_BATCH_SIZE = 256


def run_batch_command(args: argparse.Namespace, settings: Settings, backend_factory: BackendFactory | None,
                      stdout: TextIO, stderr: TextIO) -> int:
    from .batch import Options, default_prompt, run_batch

    _refuse_ignored(args)
    overrides = _sampling_from_args(args)
    if args.batch_size < 1 or args.max_doc_pages < 1:
        raise GlmvError("--batch-size and --max-doc-pages must be at least 1")
    if args.batch_size > MAX_BATCH_SIZE:  # each item in flight is a thread holding its decoded pixels
        raise GlmvError(f"--batch-size {args.batch_size} is over {MAX_BATCH_SIZE}: every item in flight holds its "
                        f"decoded image in memory and the engine batches them all at once; use a smaller one")
    opts = Options(task=args.task, prompt=default_prompt(args.task, args.prompt), out=Path(args.out), fmt=args.format,
                   batch_size=args.batch_size, retry_failed=args.retry_failed, pages=args.pages,
                   long_side=args.pdf_long_side, dpi=args.dpi, max_pixels=settings.max_pixels, thinking=args.thinking,
                   sampling_overrides=overrides, max_doc_pages=args.max_doc_pages)
    chosen, _ = _choose_backend(args, settings, backend_factory, stderr)

    def factory() -> Backend:
        backend = chosen(settings)
        backend.max_batch = max(backend.max_batch, args.batch_size)
        return backend

    code = run_batch(args.inputs, opts, factory, stderr)
    if args.json or args.json_out:
        _emit_json(args, _batch_summary(Path(args.out)), stdout)
    return code


def _batch_summary(out: Path) -> dict[str, Any]:
    """--json for batch: every item's latest status, read back from the manifest the run just wrote."""
    latest: dict[str, dict[str, Any]] = {}
    manifest = out / "manifest.jsonl"
    if manifest.exists():
        for line in manifest.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill: the run that wrote it was redone
            if isinstance(row, dict) and "id" in row:
                latest[row["id"]] = row
    counts = {s: sum(1 for r in latest.values() if r.get("status") == s) for s in ("done", "failed")}
    return {"out": str(out), "manifest": str(manifest), "items": len(latest), **counts,
            "completion_tokens": sum(int(r.get("completion_tokens") or 0) for r in latest.values()),
            "failures": [{"id": r["id"], "error": r.get("error")} for r in latest.values() if r.get("status") == "failed"]}


def run_ui(args: argparse.Namespace, settings: Settings, stderr: TextIO) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app talks to nobody but its users
    try:
        from .ui.app import WebApp
        from .ui.manager import ModelManager
        from .ui.page import build_ui, serve_ui
        from .ui.store import Store
    except ImportError:
        raise GlmvError("glmv ui needs gradio: pip install 'glmv[ui]'") from None
    from .outputs import ensure_writable_dir
    from .settings import cache_root

    out = ensure_writable_dir(Path(args.out))
    remote = _remote_backend(args) if args.backend == "openai" else None
    if args.concurrency is not None and args.concurrency < 1:
        raise GlmvError("--concurrency must be at least 1")
    # A local model answers one request at a time here; a remote server batches, so send it several.
    concurrency = args.concurrency or (8 if remote is not None else 1)

    def factory(s: Settings, log: Callable[[str], None]) -> Backend:
        if remote is not None:
            return remote(s)
        from .backends.local import LocalBackend

        def both(line: str) -> None:
            log(line)
            stderr.write(f"glmv: {line}\n")

        return LocalBackend(s, log=both).load()

    def precheck(s: Settings, log: Callable[[str], None]) -> None:
        if remote is None:  # find (or download) the checkpoint before the working model is unloaded
            from .loading import resolve_model

            resolve_model(s.model, log)

    manager = ModelManager(settings, factory, precheck)
    manager.load_async()
    app = WebApp(manager, out, max_pixels=settings.max_pixels, concurrency=concurrency,
                 store=Store(cache_root() / "ui"), examples=Path("input"))
    demo = build_ui(app)
    stderr.write(f"glmv: web app on http://{args.host}:{args.port} (the model loads in the background)\n")
    stderr.flush()

    def report() -> None:
        manager.wait()
        if manager.state == "error":
            stderr.write(f"glmv: error: {manager.message}\n")
            stderr.flush()

    threading.Thread(target=report, daemon=True).start()
    try:
        serve_ui(app, demo, args.host, args.port)
    finally:
        manager.close()
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port another server listens on now, not after loading the model (uvicorn's own bind comes
    last and ends with a log line and exit code 3). SO_REUSEADDR as uvicorn sets it: only a listener blocks."""
    if port == 0:
        return
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise GlmvError(f"cannot listen on {host}: {exc.strerror or exc} (check --host)") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            hint = "another server? choose another --port" if exc.errno == errno.EADDRINUSE else "check --host"
            raise GlmvError(f"cannot listen on {host}:{port}: {exc.strerror or exc} ({hint})") from None


def run_serve(args: argparse.Namespace, settings: Settings, backend_factory: BackendFactory, stderr: TextIO) -> int:
    try:
        import uvicorn

        from .server.app import ServerConfig, build_app
    except ImportError:
        raise GlmvError("glmv serve needs fastapi, uvicorn and openai (its response types): "
                        "pip install 'glmv[server]'") from None
    api_key = args.api_key or os.environ.get("GLMV_API_KEY")
    media_dir = None
    if args.allowed_media_dir:
        media_dir = Path(args.allowed_media_dir).expanduser()
        if not media_dir.is_dir():
            raise GlmvError(f"--allowed-media-dir '{args.allowed_media_dir}' is not a folder")
    if args.max_queue < 1 or args.max_batch < 1 or args.max_body_mb < 1:
        raise GlmvError("--max-queue, --max-batch and --max-body-mb must be at least 1")
    if args.host not in LOOPBACK and not api_key:
        stderr.write(f"glmv: warning: listening on {args.host} without --api-key: anyone who can reach this "
                     f"address can use the model\n")
    from . import resident

    idle_s = resident.parse_duration(args.idle_timeout) if args.idle_timeout else None
    state_file = Path(args.state_file) if args.state_file else None
    if state_file is not None and args.host not in LOOPBACK:
        raise GlmvError("a resident server (glmv start) listens on 127.0.0.1 only")
    _check_port_free(args.host, args.port)  # before the load, which takes minutes for the real model
    backend = backend_factory(settings)
    backend.max_batch = args.max_batch
    config = ServerConfig(model_name=args.served_model_name or settings.model, api_key=api_key,
                          allowed_media_dir=media_dir, allow_remote_media=args.allow_remote_media,
                          max_queue=args.max_queue, max_pixels=settings.max_pixels,
                          max_body_bytes=args.max_body_mb * 2**20, limits=limits_from_args(args))
    tracker = resident.ActivityTracker(build_app(backend, config))
    server = uvicorn.Server(uvicorn.Config(tracker, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=5))

    def on_ready(port: int) -> None:
        stderr.write(f"glmv: serving {config.model_name} on http://{args.host}:{port}/v1 (Ctrl-C stops)\n")
        stderr.flush()
        if state_file is not None:
            placement = backend.placement
            resolved = {"device": placement.device, "dtype": str(placement.dtype).replace("torch.", "")} if placement else {}
            sampling = {k: v for k, v in backend.default_sampling.__dict__.items() if k != "stop"}
            record = resident.Resident(
                pid=os.getpid(), port=port, model=resident.normalize_model(settings.model), api_key=api_key or "",
                settings={f: getattr(settings, f) for f in resident.MATCH_FIELDS}, started=time.time(),
                log=str(state_file.with_suffix(".log")), idle_timeout_s=idle_s, resolved=resolved, sampling=sampling)
            resident.write_state(state_file, record)

    def on_idle() -> None:
        stderr.write(f"glmv: no requests for {idle_s:.0f} s: stopping\n")
        stderr.flush()

    threading.Thread(target=resident.watch_server, args=(server, tracker, idle_s, on_ready, on_idle), daemon=True).start()
    try:
        server.run()
    finally:
        if state_file is not None:
            resident.remove_state(state_file, os.getpid())
        backend.close()
    return 0


def run_start(args: argparse.Namespace, settings: Settings, stdout: TextIO, stderr: TextIO) -> int:
    from . import resident

    idle_s = resident.parse_duration(args.idle_timeout)
    model = resident.normalize_model(settings.model)
    explicit = {f: getattr(args, f) for f in resident.MATCH_FIELDS if getattr(args, f, None) is not None}
    with resident.start_lock(stderr):
        found = _find_or_start(args, model, explicit, idle_s, stderr)
    if args.json:
        stdout.write(json.dumps(found.public()) + "\n")
    return 0


def _find_or_start(args: argparse.Namespace, model: str, explicit: dict[str, Any], idle_s: float | None,
                   stderr: TextIO) -> Any:
    from . import resident

    found, _ = resident.find_resident(model, explicit)
    if found is None:
        from .loading import _is_hub_id, resolve_model

        if model != TINY_MODEL and (Path(model).expanduser().exists() or not _is_hub_id(model)):
            resolve_model(model)  # a local folder's mistakes are found here at once, not after a background start
        serve_args = [a for f in ("device", "dtype", "quant", "engine", "max_pixels") if getattr(args, f) is not None
                      for a in (_flag(f), str(getattr(args, f)))]
        # local only, so no need for the public server's 64 MB cap: a long PDF's pages travel as data URIs
        serve_args += ["--idle-timeout", str(idle_s or 0), "--max-body-mb", "2048"]
        stderr.write(f"glmv: starting {model} in the background…\n")
        stderr.flush()
        found = resident.start(serve_args, model, stderr)
        idle = f"stops after {_duration(idle_s)} without requests" if idle_s else "no idle timeout"
        stderr.write(f"glmv: {model} is loaded in the background (pid {found.pid}, port {found.port}, {idle}); "
                     f"glmv ask/ocr/html/chat/batch use it; glmv stop stops it; log: {found.log}\n")
    else:
        stderr.write(f"glmv: {model} is already loaded in the background (pid {found.pid}, port {found.port})\n")
    return found


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def run_stop(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from . import resident

    running = resident.list_residents()
    if args.model:
        running = [r for r in running if r.model == resident.normalize_model(args.model)]
    for r in running:
        resident.stop(r)
        stderr.write(f"glmv: stopped {r.model} (pid {r.pid}, port {r.port})\n")
    if not running:
        stderr.write(f"glmv: no background model{' ' + args.model if args.model else ''} is running\n")
    if args.json:
        stdout.write(json.dumps({"stopped": [r.public() for r in running]}) + "\n")
    return 0


def run_ps(args: argparse.Namespace, stdout: TextIO) -> int:
    from . import resident

    running = resident.list_residents()
    if args.json:
        stdout.write(json.dumps({"servers": [r.public() for r in running]}) + "\n")
        return 0
    if not running:
        stdout.write("no background model (glmv start --model MODEL loads one)\n")
        return 0
    rows = [("MODEL", "PID", "PORT", "UP", "IDLE TIMEOUT", "LOG")]
    for r in running:
        up = _duration(round(time.time() - r.started))
        rows.append((r.model, str(r.pid), str(r.port), up, _duration(r.idle_timeout_s) if r.idle_timeout_s else "none", r.log))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] + "\n")
    return 0


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _shown(text: str) -> str:
    """Logged text as the terminal should show it: control characters (an answer or a file name holding ESC
    sequences could retitle the window, rewrite the clipboard or hide lines) become visible escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def run_logs(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    from . import history

    if args.action in ("on", "off"):
        history.set_enabled(args.action == "on")
        stderr.write(f"glmv: history logging is {args.action}\n")
        if args.json:
            stdout.write(json.dumps({"logging": args.action}) + "\n")
        return 0
    if args.action == "path":
        stdout.write(json.dumps({"path": str(history.db_path())}) + "\n" if args.json else f"{history.db_path()}\n")
        return 0
    with history.History() as h:
        if args.action == "status":
            state = "on" if history.enabled() else "off"
            info = {"logging": state, "path": str(h.path), "entries": h.count()}
            stdout.write(json.dumps(info) + "\n" if args.json else
                         f"history logging is {state}; {info['entries']} answer(s) in {h.path}\n")
            return 0
        if args.n < 0:
            raise UsageError("-n must be 0 (all) or more")
        entries = h.search(args.n if 0 < args.n < 2**62 else None, args.query, args.cid)  # SQLite's LIMIT is 64-bit
    if args.json:
        stdout.write(json.dumps({"entries": [e.to_dict() for e in entries]}, ensure_ascii=False) + "\n")
        return 0
    if not entries:
        stdout.write("no answers logged yet\n" if not (args.query or args.cid) else "nothing matches\n")
    for e in entries:
        d = e.to_dict()
        tokens = e.usage.get("completion_tokens")
        stdout.write(f"## {d['created']}  glmv {e.command}  {e.model}  conversation {e.conversation_id}"
                     f"{f'  {tokens} tokens' if tokens is not None else ''}\n")
        for item in e.inputs:
            digest = f" (sha256 {item['sha256'][:12]}…)" if item.get("sha256") else ""
            stdout.write(f"input: {_shown(item['source'])}{digest}\n")
        stdout.write(f"> {_shown(e.prompt)}\n\n{_shown(e.answer)}\n\n")
    return 0


def _checked(factory: BackendFactory) -> BackendFactory:
    return lambda settings: check_backend(factory(settings))


def main(
    argv: Sequence[str] | None = None,
    *,
    backend_factory: BackendFactory | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    stdin: TextIO | None = None,
) -> int:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    tutorial = _is_tutorial_form(argv)
    argv = _normalize_argv(argv)
    parser = build_parser()
    try:
        args = parse_args(parser, argv)
    except UsageError as exc:
        stderr.write(f"error: {redact_text(str(exc))}\n")  # URLs shown without their credentials
        return 2
    args.tutorial = tutorial
    debug = getattr(args, "debug", False) or bool(os.environ.get("GLMV_DEBUG"))
    if backend_factory is not None:  # a caller's own backend: one clear message if it misses a protocol member
        backend_factory = _checked(backend_factory)
    try:
        # Settings are built here, once, and handed to the command that runs the model (none for logs, ps, ...).
        settings = _settings_from_args(args) if args.command in MODEL_COMMANDS else Settings()
        if args.command in SUBCOMMANDS:
            return run_task(args, settings, backend_factory, stdout, stderr)
        if args.command == "chat":
            from .chat import run_chat

            return run_chat(args, settings, backend_factory, stdin or sys.stdin, stdout, stderr)
        if args.command == "start":
            return run_start(args, settings, stdout, stderr)
        if args.command == "stop":
            return run_stop(args, stdout, stderr)
        if args.command == "ps":
            return run_ps(args, stdout)
        if args.command == "logs":
            return run_logs(args, stdout, stderr)
        if args.command == "serve":
            return run_serve(args, settings, backend_factory or _default_backend, stderr)
        if args.command == "ui":
            return run_ui(args, settings, stderr)
        if args.command == "ground":
            return run_ground(args, settings, backend_factory or _default_backend, stdout, stderr)
        if args.command == "score":
            return run_score(args, stdout)
        if args.command == "batch":
            return run_batch_command(args, settings, backend_factory, stdout, stderr)
        if args.command == "bench":
            from .bench import run as run_bench  # imports torch: only here

            return run_bench(args)
        parser.print_help(stdout)
        return 0
    except GlmvError as exc:
        if debug:
            raise
        stderr.write(f"error: {redact_text(str(exc))}\n")  # URLs shown without their credentials
        return 2
    except KeyboardInterrupt:
        stderr.write("\nglmv: interrupted\n")
        return 130
    except BrokenPipeError:  # `glmv logs | head`: the reader has all it wants; end quietly, as Unix tools do
        _silence_stdout(stdout)
        return 128 + 13  # killed by SIGPIPE, as the shell reports it
    except Exception as exc:  # a bug, not a user error: say so briefly
        if debug:
            raise
        stderr.write(f"error: unexpected {type(exc).__name__}: {redact_text(str(exc))} "
                     f"(run with --debug for the traceback)\n")
        return 1


def _silence_stdout(stdout: TextIO) -> None:
    """Point the closed pipe's descriptor at /dev/null, so the interpreter's final flush does not fail again."""
    try:
        fd = stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (tests pass a StringIO)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()

"""``glmv chat``: a conversation in the terminal, answers streamed as they are written.

Each line is a user turn; the images given on the command line and those added with ``/image PATH`` go
with the next one. ``/thinking on|off`` switches the model's reasoning, ``/set NAME VALUE`` changes a sampling setting
(``/set max-new-tokens 200``), ``/save [FILE]`` writes the
conversation as Markdown, ``/new`` starts over, ``/help`` lists the commands. Ctrl-C stops the answer being
written (what was written stays in the conversation) and returns to the prompt; Ctrl-D or ``/exit`` quits.
Every turn goes to the history like ``glmv ask`` (``glmv chat -c`` and ``glmv ask -c`` continue each other).
The backend is chosen as for ``ask``: a resident model, a remote server, or the model in this process.
"""

from __future__ import annotations

import argparse
import difflib
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

from . import tasks
from .backends.base import Backend, Chunk, Result
from .cli import (BackendFactory, Printer, UsageError, _check_document_flags, _check_utf8, _choose_backend,
                  _conversation, _log_answer, _refuse_ignored, _sampling_from_args, summary_line)
from .errors import GlmvError
from .limits import Budget, limits_from_args
from .privacy import redact_text
from .prompts import Message, user_message
from .settings import DEFAULT_MAX_PIXELS, SamplingParams, Settings

COMMANDS = {
    "/image": "/image PATH [PATH ...]  add images (or PDFs, videos) to your next message",
    "/thinking": "/thinking on|off       let the model reason before answering, or not",
    "/set": "/set NAME VALUE        change a sampling setting: temperature, top-p, top-k, max-new-tokens, seed, ...",
    "/save": "/save [FILE]           write the conversation as Markdown (default chat-ID.md)",
    "/new": "/new                   forget the conversation and start a new one",
    "/help": "/help                  this list",
    "/exit": "/exit                  quit (Ctrl-D too)",
}


class ChatSession:
    """The conversation so far, the images waiting for the next turn, and the settings that change mid-way."""

    def __init__(self, backend: Backend, args: argparse.Namespace, model: str, where: str, sampling: SamplingParams,
                 conversation_id: str | None, messages: list[Message], stdout: TextIO, stderr: TextIO,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.backend, self.args, self.model, self.where, self.sampling = backend, args, model, where, sampling
        self.max_pixels = max_pixels
        self.conversation_id = conversation_id
        self.messages = messages
        self.pending: list[Any] = []
        self.pending_sources: list[str] = []
        self.stdout, self.stderr = stdout, stderr

    def say(self, line: str) -> None:
        self.stderr.write(f"glmv: {line}\n")
        self.stderr.flush()

    def add_inputs(self, sources: list[str], loaded: list[list[Any]] | None = None) -> None:
        for source, media in zip(sources, loaded or [load_input(self.args, s, self.max_pixels) for s in sources]):
            self.pending.extend(media)
            self.pending_sources.append(source)
            self.say(f"{source} goes with your next message ({len(media)} image(s))" if len(media) != 1 else
                     f"{source} goes with your next message")

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.stderr.write("\n".join(COMMANDS.values()) + "\nCtrl-C stops an answer; Ctrl-D quits\n")
        elif name == "/image":
            if not rest:
                raise UsageError("/image needs a path: /image photo.png")
            self.add_inputs(rest.split())
        elif name == "/thinking":
            if rest not in ("on", "off"):
                raise UsageError("use /thinking on or /thinking off")
            self.args.thinking = rest == "on"
            self.say(f"thinking {rest}")
        elif name == "/set":
            self.set(*rest.partition(" ")[::2])
        elif name == "/save":
            path = Path(rest or f"chat-{self.conversation_id or time.strftime('%Y%m%d-%H%M%S')}.md")
            self.save(path)
            self.say(f"saved the conversation to {path}")
        elif name == "/new":
            self.messages = [m for m in self.messages if m.role == "system"]
            self.conversation_id = None
            self.say("new conversation")
        else:
            close = difflib.get_close_matches(name, [*COMMANDS, "/quit"], n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UsageError(f"unknown command {name} ({hint}/help lists them)")
        return True

    def set(self, key: str, value: str) -> None:
        kinds = {"temperature": float, "top_p": float, "top_k": int, "repetition_penalty": float, "max_new_tokens": int,
                 "seed": int}
        name = key.replace("-", "_")
        if name not in kinds:
            raise UsageError(f"/set takes one of {', '.join(k.replace('_', '-') for k in kinds)}")
        try:
            number = kinds[name](value.strip())
        except ValueError:
            kind = "a whole number" if kinds[name] is int else "a number"
            raise UsageError(f"/set {key} needs {kind}, not {value.strip()!r}") from None
        self.sampling = self.sampling.merged(**{name: number})
        self.say(f"{key} {number}")

    def save(self, path: Path) -> None:
        lines = [f"# glmv chat with {self.model}", ""]
        for m in self.messages:
            who = {"user": "You", "assistant": "GLM", "system": "System"}.get(m.role, m.role)
            for image in m.images:
                lines.append(f"*image: {image.source}*")
            lines += [f"**{who}:** {m.text}", ""]
        try:
            path.write_text("\n".join(lines), encoding="utf-8")
        except OSError as exc:
            raise GlmvError(f"cannot write '{path}': {exc.strerror or exc}") from None

    def turn(self, text: str) -> None:
        """One user message and the streamed answer."""
        message = user_message(text, self.pending)
        sources, self.pending, self.pending_sources = self.pending_sources, [], []
        result = self.stream([*self.messages, message])
        self.messages += [message, Message("assistant", [result.output.answer])]
        self.stderr.write(summary_line(result) + "\n")
        payload = {"answer": result.output.answer, "thinking": result.output.thinking, "usage": result.usage.to_dict(),
                   "timings": result.timings.to_dict(result.usage.completion_tokens),
                   "finish_reason": result.finish_reason}
        self.conversation_id = _log_answer(self.args, self.conversation_id, self.model, self.where, text, sources,
                                           payload, self.sampling, self.stderr) or self.conversation_id

    def stream(self, messages: list[Message]) -> Result:
        """Ask (:func:`glmv.tasks.ask`), printing the answer as it comes; Ctrl-C cancels the generation and
        keeps what was written.

        The task runs on a helper thread and hands its events over through a queue, so Ctrl-C lands in this
        thread between chunks and never inside the backend's generator (which would end it without a result)."""
        cancel = threading.Event()
        printer = Printer(self.stdout, self.stderr, self.args.show_thinking)
        handover: queue.Queue[Any] = queue.Queue()

        def pump() -> None:
            try:
                for event in tasks.ask(self.backend, messages, self.sampling, thinking=self.args.thinking,
                                       cancel=cancel):
                    handover.put(event)
            except BaseException as exc:  # handed to the reading thread, which raises it
                handover.put(exc)
            handover.put(None)

        def received() -> Iterator[tasks.Event]:
            while (item := handover.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Chunk) and item.type in ("thinking", "answer"):
                    printer.write(item.type, item.text)
                yield item

        thread = threading.Thread(target=pump, name="glmv-chat-stream", daemon=True)
        result: Result | None = None
        while result is None:  # Ctrl-C may come at any moment, even before the thread is started
            try:
                if thread.ident is None:
                    thread.start()
                result = tasks.finish(received()).result
            except KeyboardInterrupt:
                cancel.set()  # the backend ends the stream at the next token, with what it had written
        printer.end()
        if result.finish_reason == "cancelled":
            self.say("stopped")
        return result


def load_input(args: argparse.Namespace, source: str, max_pixels: int) -> list[Any]:
    """One image, document or video, measured against the limits before it is decoded."""
    from .documents import load_inputs

    return load_inputs(source, pages=args.pages, long_side=args.pdf_long_side, dpi=args.dpi,
                       max_pixels=max_pixels, budget=Budget(limits_from_args(args)))


def _read_line(stdin: TextIO, prompt: str, stdout: TextIO) -> str:
    if stdin is sys.stdin and stdin.isatty():
        return input(prompt)  # line editing and history through readline
    stdout.write(prompt)
    stdout.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def run_chat(args: argparse.Namespace, settings: Settings, injected: BackendFactory | None, stdin: TextIO,
             stdout: TextIO, stderr: TextIO) -> int:
    _refuse_ignored(args)
    overrides = _sampling_from_args(args)
    sources = [*args.images, *args.input]
    _check_document_flags(args, sources)
    if "-" in sources:
        raise UsageError("glmv chat reads your messages from standard input, so images cannot come from it ('-')")
    conversation_id, prior = _conversation(args, stderr, settings.max_pixels)
    if args.system:
        prior = [Message("system", [args.system]), *[m for m in prior if m.role != "system"]]
    # before the model: a bad image never waits for a load
    loaded = [load_input(args, s, settings.max_pixels) for s in sources]
    factory, where = _choose_backend(args, settings, injected, stderr)
    backend = factory(settings)
    try:
        model = backend.model if where == "openai" else settings.model  # type: ignore[attr-defined]
        sampling = backend.default_sampling.merged(**overrides)
        session = ChatSession(backend, args, model, where, sampling, conversation_id, prior, stdout, stderr,
                              settings.max_pixels)
        session.add_inputs(sources, loaded)
        continuing = f" (continuing {conversation_id})" if conversation_id else ""
        stderr.write(f"glmv: chatting with {model}{continuing}. "
                     f"/help lists the commands; Ctrl-C stops an answer, Ctrl-D quits\n")
        while True:
            try:
                line = _read_line(stdin, "you> ", stdout)
            except EOFError:
                stdout.write("\n")
                break
            except KeyboardInterrupt:
                stdout.write("\n")
                session.say("Ctrl-D or /exit quits")
                continue
            if not line.strip():
                continue
            try:
                if line.startswith("/"):
                    if not session.command(line):
                        break
                else:
                    _check_utf8("your message", line)  # a Latin-1 terminal's bytes: say so, keep the chat
                    session.turn(line)
            except GlmvError as exc:
                stderr.write(f"error: {redact_text(str(exc))}\n")
                stderr.flush()
        return 0
    finally:
        backend.close()

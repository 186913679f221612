"""From generated text to typed chunks, once for every backend.

A backend only produces text: token ids decoded by :class:`IncrementalDecoder` (the local backend), content
deltas from an OpenAI-compatible server (the remote one), or pieces a test wrote (the scripted one). It
hands that text, with how many tokens produced it, to a :class:`ChunkAssembler`, which owns everything a
front end sees: the split into ``thinking`` / ``answer`` / ``tool_args`` / ``tool_call`` chunks (through
:class:`~glmv.parsing.StreamParser`), stop strings (text from the first match on is never shown, even when
the match spans two pieces), token counts and timings, the finish reason, and the final ``done`` chunk with
the parsed output. So the backends cannot disagree on any of it, and a fake backend behaves like a real one.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from ..parsing import Delta, StreamParser, ToolCall
from .base import Chunk, FinishReason, Timings, Usage

# How the text source says generation ended: the model stopped by itself (a stop token; a server's "stop"),
# the token limit cut it, the caller cancelled it; None: unknown, decided from the token count.
Ended = Literal["stop", "length", "cancelled"] | None


class IncrementalDecoder:
    """Token ids in, text deltas out, without re-decoding the whole sequence each step.

    Decodes a short window (``prefix`` .. end) and emits only what is new, holding back text that ends
    in an incomplete UTF-8 sequence (the same scheme vLLM and TGI use). Special tokens are kept: the
    output parser needs the think/box/tool tags and drops the control tokens itself.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            self._prefix = self._read
            self._read = len(self.ids)
            return full[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return full[len(prefix_text) :]


class ChunkAssembler:
    """Generated text in, :class:`~glmv.backends.base.Chunk` lists out, for one request.

    Call :meth:`push` with each piece of text (and the number of tokens it came from), then :meth:`done`
    once. After a stop string matched, :attr:`stopped` is True: the caller should stop generating; text
    pushed after that is dropped (its tokens are still counted). ``usage`` and ``timings`` are the objects
    every chunk carries; a backend may fill in what only it knows (cached tokens, queue time) before
    :meth:`done`.
    """

    def __init__(self, *, prompt_tokens: int = 0, max_new_tokens: int | None = None, stops: tuple[str, ...] = (),
                 tools: list[dict[str, Any]] | None = None, thinking_open: bool = False,
                 t0: float | None = None) -> None:
        self.parser = StreamParser(thinking_open=thinking_open, tools=tools, tools_enabled=bool(tools))
        self.usage = Usage(prompt_tokens=prompt_tokens)
        self.timings = Timings()
        self.max_new_tokens = max_new_tokens
        self.stopped = False
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1  # a stop string may still complete here
        self._pending = ""  # text not yet parsed (held back while it could be the start of a stop string)
        self._raw: list[str] = []
        self._reasoning: list[str] = []
        self._extra_calls: list[ToolCall] = []
        self._emitted_calls = 0
        self._t0 = time.perf_counter() if t0 is None else t0

    # -- input -----------------------------------------------------------------------------------
    def push(self, text: str, tokens: int = 0) -> list[Chunk]:
        """Model output: ``text`` decoded from ``tokens`` newly generated tokens (either may be empty)."""
        if not self._accept(text, tokens):
            return []
        self._raw.append(text)
        pending = self._pending + text
        if self._stops:
            hit = min((i for i in (pending.find(s) for s in self._stops) if i != -1), default=-1)
            if hit != -1:
                pending = pending[:hit]
                self.stopped = True
            cut = len(pending) if self.stopped else max(0, len(pending) - self._hold)
            text, self._pending = pending[:cut], pending[cut:]
        else:
            text, self._pending = pending, ""
        return self._parse(text)

    def push_thinking(self, text: str, tokens: int = 0) -> list[Chunk]:
        """Reasoning a server already split off (``reasoning_content``): thinking as is, no parsing."""
        if not self._accept(text, tokens):
            return []
        self._reasoning.append(text)
        return [self._chunk(Delta("thinking", text))]

    def add_tool_call(self, call: ToolCall) -> list[Chunk]:
        """A whole call a server already parsed (OpenAI ``tool_calls``); reported after the text's own calls."""
        self._extra_calls.append(call)
        return []

    # -- the end ---------------------------------------------------------------------------------
    def done(self, ended: Ended = None) -> list[Chunk]:
        """The chunks left (held-back text, the parser's tail, whole calls) and the final ``done`` chunk."""
        out = [] if self.stopped else self._parse(self._pending)
        self._pending = ""
        out.extend(self._chunk(d) for d in self.parser.finish())
        out.extend(self._new_calls())
        result = self.parser.result()
        if self._reasoning:  # reasoning split off by a server, plus any inline <think> the parser found
            result.thinking = ("".join(self._reasoning).strip() + "\n\n" + result.thinking).strip()
        for call in self._extra_calls:
            result.tool_calls.append(call)
            out.append(Chunk("tool_call", tool_call=call, usage=self.usage, timings=self.timings))
        self.timings.total_s = time.perf_counter() - self._t0
        out.append(Chunk("done", usage=self.usage, timings=self.timings, result=result,
                         finish_reason=self.finish_reason(ended, bool(result.tool_calls)), raw_text="".join(self._raw)))
        return out

    def finish_reason(self, ended: Ended, has_calls: bool) -> FinishReason:
        """Why generation ended, the same way for every backend: a stop string, cancellation, complete tool
        calls, the model's own stop, the token limit (told, or counted), else stop."""
        if self.stopped:
            return "stop"
        if ended == "cancelled":
            return "cancelled"
        if has_calls:
            return "tool_calls"
        if ended == "stop":
            return "stop"
        if ended == "length":
            return "length"
        if self.max_new_tokens is not None and self.usage.completion_tokens >= self.max_new_tokens:
            return "length"
        return "stop"

    # -- internals -------------------------------------------------------------------------------
    def _accept(self, text: str, tokens: int) -> bool:
        """Count the tokens (the first one is the time to first token); whether there is text to show."""
        if tokens:
            self.usage.completion_tokens += tokens
        if (tokens or text) and self.timings.ttft_s is None:
            self.timings.ttft_s = time.perf_counter() - self._t0
        return bool(text) and not self.stopped

    def _chunk(self, delta: Delta) -> Chunk:
        if delta.part == "tool":
            return Chunk("tool_args", text=delta.text, index=delta.index, name=delta.name, usage=self.usage,
                         timings=self.timings)
        return Chunk(delta.part, text=delta.text, usage=self.usage, timings=self.timings)

    def _parse(self, text: str) -> list[Chunk]:
        out = [self._chunk(d) for d in self.parser.feed(text)] if text else []
        return out + self._new_calls()

    def _new_calls(self) -> list[Chunk]:
        """A ``tool_call`` chunk for each call the parser completed since the last one reported."""
        calls = self.parser.tool_calls[self._emitted_calls :]
        self._emitted_calls += len(calls)
        return [Chunk("tool_call", tool_call=c, usage=self.usage, timings=self.timings) for c in calls]


__all__ = ["ChunkAssembler", "Ended", "IncrementalDecoder"]

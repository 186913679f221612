"""A scripted backend for front-end tests: it streams text a test chooses through the real parser.

It behaves like a real backend from the outside (validation, typed chunks, usage, timings, cancel)
but the "model output" is given by the test, so front ends can be tested on thinking, HTML, tool
calls and errors without a model. It records every request it receives.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator

from ..backends.base import Chunk, GenerationRequest, Timings, Usage, delta_chunk
from ..errors import GlmvError
from ..parsing import StreamParser
from ..prompts import validate_messages

Script = Callable[[GenerationRequest], "str | list[str] | GlmvError"]


class ScriptedBackend:
    name = "scripted"

    def __init__(self, script: "str | list[str] | Script", delay_s: float = 0.0) -> None:
        self._script = script
        self.delay_s = delay_s
        self.requests: list[GenerationRequest] = []
        self.default_sampling = None
        self.closed = False

    def load(self) -> "ScriptedBackend":
        return self

    def close(self) -> None:
        self.closed = True

    def _pieces(self, request: GenerationRequest) -> list[str]:
        script = self._script(request) if callable(self._script) else self._script
        if isinstance(script, GlmvError):
            raise script
        if isinstance(script, str):
            # Split like a tokenizer would: small pieces, tags possibly cut in half.
            return [script[i : i + 3] for i in range(0, len(script), 3)]
        return list(script)

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        validate_messages(request.messages)
        self.requests.append(request)
        pieces = self._pieces(request)
        return self._stream(request, pieces, cancel or threading.Event())

    def _stream(self, request: GenerationRequest, pieces: list[str], cancel: threading.Event) -> Iterator[Chunk]:
        t0 = time.perf_counter()
        usage = Usage(prompt_tokens=sum(len(m.text.split()) + 256 * len(m.images) for m in request.messages))
        timings = Timings()
        parser = StreamParser(tools=request.tools, tools_enabled=bool(request.tools))
        raw = []
        reason = "stop"
        n_calls = 0
        for i, piece in enumerate(pieces):
            if cancel.is_set():
                reason = "cancelled"
                break
            if usage.completion_tokens >= request.sampling.max_new_tokens:
                reason = "length"
                break
            if self.delay_s:
                time.sleep(self.delay_s)
            if i == 0:
                timings.ttft_s = time.perf_counter() - t0
                timings.prefill_s = timings.ttft_s
            usage.completion_tokens += 1
            raw.append(piece)
            for d in parser.feed(piece):
                yield delta_chunk(d, usage, timings)
            while len(parser.tool_calls) > n_calls:
                yield Chunk("tool_call", tool_call=parser.tool_calls[n_calls], usage=usage, timings=timings)
                n_calls += 1
        for d in parser.finish():
            yield delta_chunk(d, usage, timings)
        result = parser.result()
        if reason == "stop" and result.tool_calls:
            reason = "tool_calls"
        timings.total_s = time.perf_counter() - t0
        yield Chunk("done", usage=usage, timings=timings, result=result, finish_reason=reason, raw_text="".join(raw))  # type: ignore[arg-type]

"""A scripted backend for front-end tests: text a test chooses, streamed through the real chunk assembler.

It behaves like a real backend from the outside (validation, typed chunks, usage, timings, cancel)
but the "model output" is given by the test, so front ends can be tested on thinking, HTML, tool
calls and errors without a model. It records every request it receives.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator

from ..backends.base import BackendBase, Chunk, GenerationRequest
from ..backends.stream import ChunkAssembler, Ended
from ..errors import GlmvError
from ..prompts import validate_messages

Script = Callable[[GenerationRequest], "str | list[str] | GlmvError"]


class ScriptedBackend(BackendBase):
    name = "scripted"

    def __init__(self, script: "str | list[str] | Script", delay_s: float = 0.0) -> None:
        self._script = script
        self.delay_s = delay_s
        self.requests: list[GenerationRequest] = []
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
        # The text goes through the same assembler as every real backend's: only the "model" is scripted.
        t0 = time.perf_counter()
        out = ChunkAssembler(prompt_tokens=sum(len(m.text.split()) + 256 * len(m.images) for m in request.messages),
                             max_new_tokens=request.sampling.max_new_tokens, stops=request.sampling.stop,
                             tools=request.tools, t0=t0)
        ended: Ended = None  # the script ran out: a stop token if one still fits, else the limit (as for a model)
        for piece in pieces:
            if cancel.is_set():
                ended = "cancelled"
                break
            if out.usage.completion_tokens >= request.sampling.max_new_tokens:
                break
            if self.delay_s:
                time.sleep(self.delay_s)
            yield from out.push(piece, tokens=1)
            out.timings.prefill_s = out.timings.ttft_s
            if out.stopped:
                break
        yield from out.done(ended)

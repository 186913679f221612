"""The backend interface every front end talks to, and the typed chunks it streams.

A backend turns a :class:`GenerationRequest` (messages with images, sampling, thinking on or off,
optional tools) into a stream of :class:`Chunk` objects: text deltas labelled ``thinking`` or
``answer``, parsed tool calls, and one final ``done`` chunk carrying the parsed result, token counts
and timings. Statistics travel beside the text, never inside it. Streams can be cancelled between
tokens with a :class:`threading.Event`, or by closing the iterator.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Protocol

from ..errors import GlmvError
from ..parsing import ParsedOutput, ToolCall
from ..prompts import Message
from ..settings import SamplingParams

ChunkType = Literal["status", "thinking", "answer", "tool_args", "tool_call", "done"]
FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


@dataclass
class GenerationRequest:
    """One generation: the conversation and how to sample it."""

    messages: list[Message]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    thinking: bool = True
    tools: list[dict[str, Any]] | None = None
    # max_new_tokens was asked for (an API's max_tokens): a prompt that leaves less room is refused, not cut
    exact_max_tokens: bool = False
    # prompt-lookup speculative decoding (fast engine): None = the backend's setting (auto: on when the prompt
    # carries text the answer is likely to copy)
    speculate: bool | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    # speculative decoding: drafted tokens the model kept / threw away; decode passes that verified a draft
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    speculative_steps: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        d = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cached_tokens": self.cached_tokens,
        }
        if self.speculative_steps:
            d.update(accepted_prediction_tokens=self.accepted_prediction_tokens,
                     rejected_prediction_tokens=self.rejected_prediction_tokens,
                     speculative_steps=self.speculative_steps)
        return d


@dataclass
class Timings:
    """Seconds measured for one request. ``ttft_s`` includes media processing; ``prefill_s`` does not."""

    ttft_s: float | None = None
    prefill_s: float | None = None
    total_s: float = 0.0
    queued_s: float = 0.0

    @property
    def decode_s(self) -> float:
        return max(0.0, self.total_s - (self.ttft_s or 0.0))

    def tokens_per_s(self, completion_tokens: int) -> float | None:
        """Decode speed: tokens after the first over the time after the first."""
        if completion_tokens < 2 or self.decode_s <= 0:
            return None
        return (completion_tokens - 1) / self.decode_s

    def to_dict(self, completion_tokens: int) -> dict[str, float | None]:
        tps = self.tokens_per_s(completion_tokens)
        return {
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 4),
            "prefill_s": None if self.prefill_s is None else round(self.prefill_s, 4),
            "total_s": round(self.total_s, 4),
            "queued_s": round(self.queued_s, 4),
            "tokens_per_s": None if tps is None else round(tps, 2),
        }


@dataclass
class Chunk:
    """One piece of a streamed generation."""

    type: ChunkType
    text: str = ""
    tool_call: ToolCall | None = None
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    # "tool_args": a fragment (``text``) of call ``index``'s JSON arguments; its first chunk carries ``name``.
    # A "tool_call" chunk follows when the call is complete.
    index: int = -1
    name: str | None = None
    # Only on the final "done" chunk:
    result: ParsedOutput | None = None
    finish_reason: FinishReason | None = None
    raw_text: str = ""


class Backend(Protocol):
    """What a front end needs from a model runner. Front ends use these with plain attribute access; every
    backend has all of them (:class:`BackendBase` gives the defaults a backend without a local model has)."""

    name: str
    default_sampling: SamplingParams  # the model's own defaults (a checkpoint's generation config)
    max_batch: int  # requests decoded together at most (settable: serve --max-batch, batch --batch-size)
    placement: Any  # where a local model runs (glmv.loading.Placement), None elsewhere
    served_model: str | None  # the model name a remote server reports, None for a local model
    base_url: str | None  # the server a remote backend talks to

    def load(self) -> Any:
        """Load the model (or check the server answers) and return the backend; front ends call it up front
        to show progress."""
        ...

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """Stream the answer. Raises :class:`GlmvError` subclasses for bad requests before any model work."""
        ...

    @property
    def queue_depth(self) -> int:
        """Requests waiting or running."""
        ...

    @property
    def context_length(self) -> int | None:
        """Prompt plus answer tokens the model takes at most (None: not known here, e.g. not loaded yet)."""
        ...

    def serving_stats(self) -> dict[str, float]:
        """Engine counters for /metrics (prefix cache, speculation); empty when there are none."""
        ...

    def close(self) -> None: ...


PROTOCOL_MEMBERS = ("name", "default_sampling", "max_batch", "placement", "served_model", "base_url", "load", "generate",
                    "queue_depth", "context_length", "serving_stats", "close")


def check_backend(backend: Any) -> Any:
    """``backend`` itself, once it is known to have every :class:`Backend` member: a backend written to an older,
    shorter protocol gets one clear message here instead of an AttributeError deep inside a front end."""
    missing = [m for m in PROTOCOL_MEMBERS if not hasattr(backend, m)]
    if missing:
        raise GlmvError(f"the backend {type(backend).__name__} lacks {', '.join(missing)}: subclass "
                        "glmv.backends.base.BackendBase (it supplies defaults for all but generate)")
    return backend


class BackendBase:
    """Defaults for the :class:`Backend` members a backend has no use for. A new backend subclasses it,
    implements ``generate`` by handing its text to :class:`~glmv.backends.stream.ChunkAssembler`, and
    overrides what it knows better."""

    name = "backend"
    default_sampling: SamplingParams = SamplingParams()
    max_batch = 1
    placement: Any = None
    served_model: str | None = None
    base_url: str | None = None

    def load(self) -> Any:
        return self

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        raise NotImplementedError

    @property
    def queue_depth(self) -> int:
        return 0

    @property
    def context_length(self) -> int | None:
        return None

    def serving_stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


@dataclass
class Result:
    """A finished generation, collected from a chunk stream."""

    output: ParsedOutput
    usage: Usage
    timings: Timings
    finish_reason: FinishReason
    raw_text: str = ""
    trace: list[dict[str, Any]] = field(default_factory=list)  # tool steps, when the tool loop ran

    def to_dict(self) -> dict[str, Any]:
        d = self.output.to_dict()
        d.update(
            usage=self.usage.to_dict(),
            timings=self.timings.to_dict(self.usage.completion_tokens),
            finish_reason=self.finish_reason,
        )
        if self.trace:
            d["trace"] = self.trace
        return d


def collect(chunks: Iterator[Chunk]) -> Result:
    """Drain a chunk stream into a :class:`Result`."""
    for chunk in chunks:
        if chunk.type == "done":
            assert chunk.result is not None and chunk.finish_reason is not None
            return Result(chunk.result, chunk.usage, chunk.timings, chunk.finish_reason, chunk.raw_text)
    raise GlmvError("the backend ended the stream without a result")

"""The local backend: GLM-4.6V through Hugging Face transformers, on one inference thread.

One thread owns the model (CUDA graphs and caches keep thread-local state); callers hand it jobs
through a queue and read token ids back through a per-job queue. Media processing and validation run
on the caller's thread, before the job is queued, so a bad request never reaches the GPU. The caller
side turns token ids into text incrementally (keeping special tokens, which the output parser needs)
and into typed chunks. Cancelling (an event, or closing the iterator) stops generation at the next
token.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import ContextLengthError, GenerationError, GlmvError
from ..loading import Log, _stderr_log, choose_placement, load_checkpoint, resolve_model
from ..parsing import StreamParser
from ..prompts import to_template_messages, validate_messages
from ..settings import SamplingParams, Settings
from .base import Chunk, GenerationRequest, Timings, Usage


class IncrementalDecoder:
    """Token ids in, text deltas out, without re-decoding the whole sequence each step.

    Decodes a short window (``prefix`` .. end) and emits only what is new, holding back text that ends
    in an incomplete UTF-8 sequence (the same scheme vLLM and TGI use).
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


@dataclass
class _Job:
    inputs: dict[str, Any]
    gen_kwargs: dict[str, Any]
    cancel: threading.Event
    seed: int | None
    out: "queue.Queue[tuple[str, Any]]" = field(default_factory=queue.Queue)
    queued_at: float = field(default_factory=time.perf_counter)


class _StreamToQueue:
    """A transformers streamer that forwards generated token ids (not the prompt) to a job queue."""

    def __init__(self, job: _Job) -> None:
        self._job = job
        self._prompt_seen = False
        self.first_token_at: float | None = None

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        ids = value.reshape(-1).tolist()
        self._job.out.put(("tokens", ids))

    def end(self) -> None:
        pass


class _CancelCriteria:
    """Stops generation once the job's cancel event is set (checked after every token)."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool, device=input_ids.device)


class LocalBackend:
    """Runs a checkpoint in this process. ``load()`` is explicit so front ends can show progress."""

    name = "local"

    def __init__(self, settings: Settings, log: Log = _stderr_log) -> None:
        self.settings = settings
        self._log = log
        self.processor: Any = None
        self.model: Any = None
        self.model_path: Any = None
        self.placement: Any = None
        self._jobs: "queue.Queue[_Job | None]" = queue.Queue()
        self._thread: threading.Thread | None = None
        self._busy = threading.Event()
        self._load_lock = threading.Lock()
        self.default_sampling = settings.sampling

    # -- loading ------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> "LocalBackend":
        with self._load_lock:
            if self.model is not None:
                return self
            placement = choose_placement(self.settings)
            path = resolve_model(self.settings.model, self._log)
            self._log(f"loading {self.settings.model} ({placement.describe()}) ...")
            self.processor, self.model = load_checkpoint(path, placement, self.settings.model, self._log)
            self.model_path, self.placement = path, placement
            self.default_sampling = self._checkpoint_sampling(self.settings.sampling)
            self._thread = threading.Thread(target=self._worker, name="glmv-inference", daemon=True)
            self._thread.start()
        return self

    def _checkpoint_sampling(self, base: SamplingParams) -> SamplingParams:
        """Model-card defaults, replaced by what the checkpoint's generation_config sets."""
        gc = getattr(self.model, "generation_config", None)
        if gc is None:
            return base
        found = {
            k: getattr(gc, k, None)
            for k in ("temperature", "top_p", "top_k", "repetition_penalty")
            if getattr(gc, k, None) is not None
        }
        try:
            return base.merged(**found)
        except GlmvError:
            return base

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=30)
            self._thread = None
        self.model = None
        self.processor = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    @property
    def context_length(self) -> int:
        cfg = self.model.config
        text_cfg = getattr(cfg, "text_config", cfg)
        return int(getattr(text_cfg, "max_position_embeddings", 131072))

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize() + (1 if self._busy.is_set() else 0)

    # -- preparing inputs (caller's thread) ----------------------------------------------------
    def render_prompt(self, request: GenerationRequest) -> str:
        messages, _ = to_template_messages(request.messages)
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if not request.thinking:
            kwargs["enable_thinking"] = False
        if request.tools:
            kwargs["tools"] = request.tools
        return self.processor.apply_chat_template(messages, **kwargs)

    def prepare(self, request: GenerationRequest) -> tuple[dict[str, Any], str]:
        """Validate and process a request into model inputs (no GPU work)."""
        validate_messages(request.messages)
        if self.model is None:
            self.load()
        prompt = self.render_prompt(request)
        _, images = to_template_messages(request.messages)
        try:
            inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt")
        except Exception as exc:
            raise GlmvError(f"cannot prepare the prompt: {exc}") from None
        inputs = dict(inputs)
        inputs.pop("token_type_ids", None)
        n_prompt = int(inputs["input_ids"].shape[1])
        limit = self.context_length
        if n_prompt >= limit:
            raise ContextLengthError(
                f"the prompt is {n_prompt} tokens (text plus images) but the model's context is {limit}: "
                f"use fewer or smaller images (--max-pixels) or a shorter prompt"
            )
        return inputs, prompt

    def _generation_kwargs(self, sampling: SamplingParams, n_prompt: int) -> dict[str, Any]:
        max_new = min(sampling.max_new_tokens, self.context_length - n_prompt)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "repetition_penalty": sampling.repetition_penalty,
        }
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k or None,
            )
        return kwargs

    # -- the inference thread ------------------------------------------------------------------
    def _worker(self) -> None:
        import torch

        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancel.is_set():
                job.out.put(("done", {"cancelled": True, "prefill_s": None, "queued_s": 0.0}))
                continue
            self._busy.set()
            started = time.perf_counter()
            streamer = _StreamToQueue(job)
            try:
                device = self.model.device
                inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in job.inputs.items()}
                if "pixel_values" in inputs:
                    inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
                if job.seed is not None:
                    torch.manual_seed(job.seed)
                with torch.inference_mode():
                    self.model.generate(
                        **inputs,
                        **job.gen_kwargs,
                        streamer=streamer,
                        stopping_criteria=[_CancelCriteria(job.cancel)],
                    )
                job.out.put(
                    (
                        "done",
                        {
                            "cancelled": job.cancel.is_set(),
                            "prefill_s": None if streamer.first_token_at is None else streamer.first_token_at - started,
                            "queued_s": started - job.queued_at,
                        },
                    )
                )
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                job.out.put(("error", GenerationError("out of GPU memory: lower --max-pixels, --max-new-tokens or the number of images")))
            except Exception as exc:  # reported to the caller; the thread keeps serving
                job.out.put(("error", GenerationError(f"generation failed: {type(exc).__name__}: {exc}")))
            finally:
                self._busy.clear()

    # -- public API ----------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        t0 = time.perf_counter()
        inputs, prompt = self.prepare(request)  # raises before any GPU work
        return self._stream(request, inputs, prompt, cancel or threading.Event(), t0)

    def _stream(
        self, request: GenerationRequest, inputs: dict[str, Any], prompt: str, cancel: threading.Event, t0: float
    ) -> Iterator[Chunk]:
        sampling = request.sampling
        n_prompt = int(inputs["input_ids"].shape[1])
        gen_kwargs = self._generation_kwargs(sampling, n_prompt)
        eos = self._eos_ids()
        job = _Job(inputs=inputs, gen_kwargs=gen_kwargs, cancel=cancel, seed=sampling.seed)
        ahead = self.queue_depth
        self._jobs.put(job)
        if ahead:
            yield Chunk("status", text=f"waiting: {ahead} request(s) ahead")

        decoder = IncrementalDecoder(self.processor.tokenizer)
        parser = StreamParser(thinking_open=prompt.rstrip().endswith("<think>"))
        stops = sampling.stop
        hold = max((len(s) for s in stops), default=1) - 1
        usage = Usage(prompt_tokens=n_prompt)
        timings = Timings()
        raw: list[str] = []
        pending = ""  # decoded text not yet fed to the parser (held back for stop strings)
        last_id: int | None = None
        stopped_by_string = False
        finished = False

        def feed(text: str) -> Iterator[Chunk]:
            for delta in parser.feed(text):
                yield Chunk(delta.part, text=delta.text, usage=usage, timings=timings)
            while len(parser.tool_calls) > emitted_calls[0]:
                call = parser.tool_calls[emitted_calls[0]]
                emitted_calls[0] += 1
                yield Chunk("tool_call", tool_call=call, usage=usage, timings=timings)

        emitted_calls = [0]
        try:
            while True:
                kind, payload = job.out.get()
                if kind == "tokens":
                    if timings.ttft_s is None:
                        timings.ttft_s = time.perf_counter() - t0
                    usage.completion_tokens += len(payload)
                    last_id = payload[-1]
                    text = decoder.push([i for i in payload if i not in eos])
                    if not text or stopped_by_string:
                        continue
                    raw.append(text)
                    pending += text
                    if stops:
                        hit = min((i for i in (pending.find(s) for s in stops) if i != -1), default=-1)
                        if hit != -1:
                            pending = pending[:hit]
                            stopped_by_string = True
                            cancel.set()
                        cut = len(pending) if stopped_by_string else max(0, len(pending) - hold)
                        text, pending = pending[:cut], pending[cut:]
                    else:
                        text, pending = pending, ""
                    yield from feed(text)
                elif kind == "error":
                    raise payload
                else:  # done
                    tail = "" if stopped_by_string else decoder.flush()
                    raw.append(tail)
                    yield from feed(pending + tail)
                    for delta in parser.finish():
                        yield Chunk(delta.part, text=delta.text, usage=usage, timings=timings)
                    timings.total_s = time.perf_counter() - t0
                    timings.prefill_s = payload["prefill_s"]
                    timings.queued_s = payload["queued_s"]
                    result = parser.result()
                    if stopped_by_string:
                        reason = "stop"
                    elif payload["cancelled"]:
                        reason = "cancelled"
                    elif result.tool_calls:
                        reason = "tool_calls"
                    elif last_id is not None and last_id in eos:
                        reason = "stop"
                    elif usage.completion_tokens >= gen_kwargs["max_new_tokens"]:
                        reason = "length"
                    else:
                        reason = "stop"
                    finished = True
                    yield Chunk(
                        "done",
                        usage=usage,
                        timings=timings,
                        result=result,
                        finish_reason=reason,  # type: ignore[arg-type]
                        raw_text="".join(raw),
                    )
                    return
        finally:
            if not finished:
                cancel.set()  # the caller went away: free the inference thread at the next token

    def _eos_ids(self) -> set[int]:
        gc = getattr(self.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None)
        if eos is None:
            eos = self.processor.tokenizer.eos_token_id
        return set(eos if isinstance(eos, (list, tuple)) else [eos])


__all__ = ["LocalBackend", "IncrementalDecoder"]

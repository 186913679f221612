"""The inference thread's scheduler: the queue of requests and how they are batched onto the model.

Callers (the local backend's ``generate``) put a :class:`Job` in the queue and read token ids back from the
job's own queue. One thread takes jobs off the queue and runs them:

- with the fast engine, continuously (:class:`glmv.engine.scheduler.Batcher`): between two decode steps,
  queued jobs take the free cache rows and join the running batch; each leaves when it is done;
- with transformers' ``generate`` (the CPU default, nf4, the MoE model, prompts too long for the engine's
  cache), jobs queued together with the same sampling settings share one ``generate`` call.

Cancelling a queued job takes it out of the queue; a running one stops at its next token.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import GenerationError
from ..settings import SamplingParams

# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The inference thread
# lets go of the GIL at every device wait (the graph replay, the copy of the new tokens); if a consumer thread
# (detokenizing, assembling chunks, the server's event loop, a new request's image processing) holds it then,
# the next step starts only when that thread lets go or this interval ends: with eight users a 6 ms decode step
# could wait as long again. Process-wide: set while any continuous batcher runs, restored when the last stops.
SWITCH_INTERVAL_S = 0.0005


class _SwitchInterval:
    """Shortens ``sys.setswitchinterval`` while at least one inference thread runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = 0.0

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, SWITCH_INTERVAL_S))
            self._users += 1

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                sys.setswitchinterval(self._saved)


_switch_interval = _SwitchInterval()

OOM_MESSAGE = "out of GPU memory: lower --max-pixels, --max-new-tokens or the number of images"


class Outbox(queue.SimpleQueue):
    """A job's results: ("tokens", ids) per step, then ("done", info) or ("error", exc). A SimpleQueue: its
    put is one C call, no Python-level lock and condition, so handing a step's tokens to each request costs the
    inference thread little (a subclass, so a test can wrap ``put`` on one instance)."""


@dataclass(eq=False)  # identity: the queue removes jobs by identity (comparing tensors would raise)
class Job:
    inputs: dict[str, Any]
    sampling: SamplingParams
    max_new_tokens: int  # the request's, already cut to the room the context leaves
    cancel: threading.Event
    seed: int | None
    speculate: bool = False
    out: Outbox = field(default_factory=Outbox)
    queued_at: float = field(default_factory=time.perf_counter)


def _media_kind(inputs: dict[str, Any]) -> str:
    has_video, has_image = "pixel_values_videos" in inputs, "pixel_values" in inputs
    return "mixed" if has_video and has_image else "video" if has_video else "image"  # text-only joins images


def _batch_key(job: Job) -> tuple:
    # Video is never batched with images: one generate call takes one kind of visual input.
    gen = hf_generate_kwargs(job.sampling, job.max_new_tokens)
    return (_media_kind(job.inputs), *sorted((k, repr(v)) for k, v in gen.items()))


def hf_generate_kwargs(sampling: SamplingParams, max_new_tokens: int) -> dict[str, Any]:
    """The sampling settings as transformers' ``generate`` takes them (its greedy mode when sampling is off)."""
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "repetition_penalty": sampling.repetition_penalty}
    if sampling.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=sampling.top_k or None)
    return kwargs


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Join processed prompts into one left-padded batch (visual inputs concatenated in order)."""
    import torch
    import torch.nn.functional as F

    if len(items) == 1:
        return dict(items[0])
    width = max(int(x["input_ids"].shape[1]) for x in items)
    out: dict[str, Any] = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        if key in items[0]:
            out[key] = torch.cat([F.pad(x[key], (width - x[key].shape[1], 0), value=fill) for x in items])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [x[key] for x in items if key in x]
        if parts:
            out[key] = torch.cat(parts)
    return out


class BatchStreamer:
    """A transformers streamer that routes each row's new token ids to its job's queue.

    A row is finished (and its caller told at once, not when the whole batch ends) when it emits a stop
    token or its job is cancelled; after that the padding generate() adds for it is dropped.
    """

    def __init__(self, jobs: list[Job], eos: set[int], started: float) -> None:
        self._jobs = jobs
        self._eos = eos
        self._started = started
        self._prompt_seen = False
        self._done = [False] * len(jobs)
        self._first: float | None = None

    def _info(self, job: Job, cancelled: bool) -> dict[str, Any]:
        return {
            "cancelled": cancelled,
            "prefill_s": None if self._first is None else self._first - self._started,
            "queued_s": self._started - job.queued_at,
        }

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.tokens(value.reshape(len(self._jobs), -1).tolist())

    def tokens(self, rows: list) -> bool:
        """Route one step's new ids (one entry per row); True once every row is finished."""
        if self._first is None:
            self._first = time.perf_counter()
        for i, (job, row) in enumerate(zip(self._jobs, rows)):
            if self._done[i]:
                continue
            row = row if isinstance(row, list) else [row]
            job.out.put(("tokens", row))
            if job.cancel.is_set() or row[-1] in self._eos:
                self._done[i] = True
                job.out.put(("done", self._info(job, job.cancel.is_set() and row[-1] not in self._eos)))
        return all(self._done)

    def end(self) -> None:
        pass

    def finish_all(self) -> None:
        for i, job in enumerate(self._jobs):
            if not self._done[i]:
                self._done[i] = True
                job.out.put(("done", self._info(job, job.cancel.is_set())))

    def fail_all(self, error: Exception) -> None:
        for i, job in enumerate(self._jobs):
            if not self._done[i]:
                self._done[i] = True
                job.out.put(("error", error))


class CancelCriteria:
    """Stops each row once its job's cancel event is set (checked after every token)."""

    def __init__(self, events: list[threading.Event]) -> None:
        self._events = events

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        flags = [e.is_set() for e in self._events]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class Runner(Protocol):
    """What the scheduler needs from the backend that owns the model."""

    engine: Any  # glmv.engine.fast.FastEngine or None
    batcher: Any  # glmv.engine.scheduler.Batcher or None

    def eos_ids(self) -> set[int]: ...

    def hf_generate(self, jobs: list[Job], streamer: BatchStreamer) -> None: ...


def _failure(exc: Exception) -> GenerationError:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return GenerationError(OOM_MESSAGE)
    return GenerationError(f"generation failed: {type(exc).__name__}: {exc}")


class Scheduler:
    def __init__(self, max_batch: int = 8) -> None:
        self.max_batch = max_batch
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent batch sizes (for metrics and tests)
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._running = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._runner: Runner | None = None

    def start(self, runner: Runner) -> None:
        self._runner = runner
        self._stopping = False
        self._thread = threading.Thread(target=self._worker, name="glmv-inference", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            with self._cv:
                self._stopping = True
                self._cv.notify_all()
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def queue_depth(self) -> int:
        """Requests waiting or running."""
        with self._cv:
            return len(self._pending) + self._running

    def submit(self, job: Job) -> int:
        """Queue a job; returns how many requests it waits behind (0: it starts at the next step)."""
        with self._cv:
            ahead = len(self._pending) + self._running
            batcher = self._runner.batcher if self._runner is not None else None
            if batcher is not None and batcher.can_admit(job.seed) and not self._pending:
                ahead = 0  # a free cache row: it joins the running batch at the next step
            self._pending.append(job)
            self._cv.notify()
        return ahead

    def withdraw(self, job: Job) -> bool:
        """Take a job out of the queue if it is still waiting there (True if it was)."""
        with self._cv:
            try:
                self._pending.remove(job)
            except ValueError:
                return False
            return True

    # -- the inference thread ------------------------------------------------------------------
    def _worker(self) -> None:
        assert self._runner is not None
        if self._runner.batcher is not None:
            self._continuous(self._runner)
        else:
            self._static(self._runner)

    def _take_batch(self) -> list[Job] | None:
        """Wait for work; return the oldest job plus queued jobs that can share its generate call."""
        with self._cv:
            while not self._pending and not self._stopping:
                self._cv.wait()
            if self._stopping and not self._pending:
                return None
            first = self._pending.popleft()
            batch = [first]
            if first.seed is None and self.max_batch > 1:
                key = _batch_key(first)
                for job in list(self._pending):
                    if len(batch) >= self.max_batch:
                        break
                    if job.seed is None and _batch_key(job) == key:
                        self._pending.remove(job)
                        batch.append(job)
            self._running = len(batch)
            self.batch_sizes.append(len(batch))
            return batch

    def _static(self, runner: Runner) -> None:
        """transformers' generate: one batch at a time."""
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [j for j in batch if not j.cancel.is_set()]
            for j in batch:
                if j.cancel.is_set():
                    j.out.put(("done", {"cancelled": True, "prefill_s": None, "queued_s": 0.0}))
            streamer = BatchStreamer(live, runner.eos_ids(), time.perf_counter())
            try:
                if live:
                    runner.hf_generate(live, streamer)
                streamer.finish_all()
            except Exception as exc:  # reported to the callers; the thread keeps serving
                streamer.fail_all(_failure(exc))
            finally:
                with self._cv:
                    self._running = 0

    def _continuous(self, runner: Runner) -> None:
        """The fast engine: admit queued jobs into free cache rows between steps, run one step, repeat."""
        with _switch_interval:
            self._serve(runner, runner.batcher)

    def _serve(self, runner: Runner, batcher: Any) -> None:
        while True:
            with self._cv:
                while not self._pending and not batcher.busy and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._pending and not batcher.busy:
                    return
                admitted = []
                while self._pending and batcher.can_admit(self._pending[0].seed) and len(admitted) < len(batcher.free):
                    admitted.append(self._pending.popleft())
                self._running = len(batcher.running) + len(batcher.prefilling) + len(admitted)
                if admitted:
                    self.batch_sizes.append(self._running)
            try:
                for job in admitted:
                    self._admit(runner, job)
                if batcher.busy:
                    batcher.step()
            except Exception as exc:  # reported to the callers; the thread keeps serving
                batcher.fail_all(_failure(exc), lambda seq, e: seq.tag.out.put(("error", e)))
            with self._cv:
                self._running = len(batcher.running) + len(batcher.prefilling)

    def _admit(self, runner: Runner, job: Job) -> None:
        """Hand a job to the batcher (or, too long for the engine's cache, to transformers' generate)."""
        from ..engine.scheduler import RowParams, Sequence

        started = time.perf_counter()
        if job.cancel.is_set():
            job.out.put(("done", {"cancelled": True, "prefill_s": None, "queued_s": started - job.queued_at}))
            return
        if not runner.engine.fits([job.inputs], job.max_new_tokens):
            streamer = BatchStreamer([job], runner.eos_ids(), started)
            try:
                runner.hf_generate([job], streamer)
                streamer.finish_all()
            except Exception as exc:
                streamer.fail_all(_failure(exc))
            return

        def finish(info: dict[str, Any]) -> None:
            job.out.put(("done", {**info, "queued_s": started - job.queued_at}))

        runner.batcher.add(Sequence(inputs=job.inputs, params=RowParams.from_sampling(job.sampling, job.max_new_tokens),
                                    emit=lambda ids: job.out.put(("tokens", ids)), finish=finish,
                                    cancelled=job.cancel.is_set, eos=frozenset(runner.eos_ids()),
                                    speculate=job.speculate, seed=job.seed, tag=job,
                                    fail=lambda exc: job.out.put(("error", _failure(exc)))))


__all__ = ["BatchStreamer", "CancelCriteria", "Job", "Outbox", "Runner", "Scheduler", "collate", "hf_generate_kwargs"]

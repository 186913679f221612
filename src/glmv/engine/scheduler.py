"""Continuous batching over the fast engine: requests join and leave between decode steps.

The :class:`Batcher` owns the engine's cache rows. Each :meth:`Batcher.step` does, in order:

1. drops cancelled requests (their rows are free for the next newcomer at once);
2. prefills one chunk (``prefill_chunk`` tokens) of the oldest request still prefilling: a decoding row never
   waits for more than one chunk (plus the vision tower, on the chunk that needs it). A request starting its
   prefill first looks its prompt up in the prefix cache and copies the cached blocks into its row;
3. verifies prompt-lookup drafts for the requests that speculate and found one (one pass for all of them),
   while at most ``SPEC_MAX_ROWS`` requests decode;
4. decodes one token for every other running request, each with its own sampling parameters.

A request's first token is sampled as soon as its last prefill chunk ran, so it joins the decode batch at
the very next step; when it stops (a stop token, its length, cancellation) its row is freed and its prompt
and answer go to the prefix cache for the next turn. Requests with a seed run alone, so their sampling is
reproducible.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..settings import SamplingParams
from .fast import ALONE_CHUNKS, FastEngine
from .prefix_cache import PrefixCache, media_digests, media_spans
from .speculate import NgramIndex, verify


# Drafts are verified only while at most this many requests decode. Each verification is a pass of its own
# (on an H200 5.9 ms, against 5.4 ms for a batch-1 step and 6.3 ms for a batch-8 one), which every other
# row waits for: with three rows decoding it pays only if a draft gains more than ~2 tokens per pass,
# and on the GPU the serving benchmark's passes averaged 1.7-1.8 tokens.
SPEC_MAX_ROWS = 2


@dataclass
class RowParams:
    """One request's sampling parameters, as the engine applies them."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256

    @classmethod
    def from_sampling(cls, sampling: SamplingParams, max_new_tokens: int) -> "RowParams":
        if sampling.greedy:  # temperature, top-k and top-p play no part (as in transformers' greedy mode)
            return cls(greedy=True, repetition_penalty=sampling.repetition_penalty, max_new_tokens=max_new_tokens)
        return cls(greedy=False, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                   repetition_penalty=sampling.repetition_penalty, max_new_tokens=max_new_tokens)


@dataclass
class Segment:
    """New tokens of one row for :meth:`FastEngine.extend`."""

    row: int
    embeds: torch.Tensor  # [T, hidden]
    pos3: torch.Tensor  # [3, T] multimodal rope positions
    start: int  # cache slot of the first token
    logits: str | None  # "last", "all" or None

    @property
    def length(self) -> int:
        return int(self.embeds.shape[0])


@dataclass(eq=False)
class Sequence:
    """One request inside the batcher. The callbacks run on the inference thread."""

    inputs: dict[str, Any]
    params: RowParams
    emit: Callable[[list[int]], None]  # new token ids, in order
    finish: Callable[[dict[str, Any]], None]  # called once: cancelled, cached_tokens, prefill_s, speculation stats
    cancelled: Callable[[], bool]
    eos: frozenset[int]
    fail: Callable[[Exception], None] = lambda exc: None  # called instead of finish when its prefill fails
    speculate: bool = False
    seed: int | None = None
    tag: Any = None  # the caller's handle for this request (the backend's job)
    # state kept by the batcher
    row: int = -1
    ids: list[int] = field(default_factory=list)  # prompt, then the tokens generated so far
    n_prompt: int = 0
    filled: int = 0  # cache slots holding this request's keys/values
    delta: int = 0  # rope offset of positions after the prompt
    pos3: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    digests: list[bytes] | None = None  # of the prompt's images (prefix-cache keys)
    cached_tokens: int = 0
    generated: int = 0
    pending: int | None = None  # the last sampled token, not yet in the cache
    index: NgramIndex | None = None
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None


class Batcher:
    def __init__(self, engine: FastEngine, prefix_cache: PrefixCache | None = None) -> None:
        self.engine = engine
        self.cache = prefix_cache
        self.free = list(range(engine.config.max_batch))
        self.prefilling: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self.exclusive = False  # a seeded request runs alone
        self.steps = 0  # decode or verification passes
        self.spec_steps = 0
        self.spec_tokens = 0  # tokens produced by verification passes (accepted drafts + the model's own)

    # -- admission -------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.prefilling or self.running)

    def can_admit(self, seed: int | None) -> bool:
        if self.exclusive or not self.free:
            return False
        return seed is None or not self.busy

    def add(self, seq: Sequence) -> None:
        """Give a request a row; its prefill starts at a following step (in arrival order)."""
        seq.row = self.free.pop(0)
        seq.ids = seq.inputs["input_ids"][0].tolist()
        seq.n_prompt = len(seq.ids)
        limit = self.engine.config.max_seq_len - seq.n_prompt
        seq.params.max_new_tokens = max(1, min(seq.params.max_new_tokens, limit))
        if seq.seed is not None:
            self.exclusive = True
            torch.manual_seed(seq.seed)
        self.engine.start_row(seq.row, seq.params, seq.inputs["input_ids"][0])
        self.prefilling.append(seq)

    # -- one iteration ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        for seq in [*self.prefilling, *self.running.values()]:
            if seq.cancelled():
                self._finish(seq, cancelled=True)
        if self.prefilling:
            seq = self.prefilling[0]
            try:
                self._prefill_chunk(seq)
            except Exception as exc:  # this request's own inputs: fail it alone, the others keep going
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise
                self._release(seq)
                seq.fail(exc)
        drafts = {}
        for row, seq in self.running.items():
            if seq.speculate and len(self.running) <= SPEC_MAX_ROWS:
                room = min(self.engine.config.spec_tokens, seq.params.max_new_tokens - seq.generated - 1,
                           self.engine.config.max_seq_len - seq.filled - 2)
                d = seq.index.draft(room) if (seq.index is not None and room > 0) else []
                if d:
                    drafts[row] = d
        if drafts:
            self._verify(drafts)
        rows = [r for r in self.running if r not in drafts]
        if rows:
            greedy = all(self.running[r].params.greedy for r in rows)
            ids = self.engine.decode(rows, greedy)
            self.steps += 1
            for r, tok in zip(rows, ids):
                seq = self.running[r]
                seq.filled += 1  # the pending token's keys/values were written by this step
                self._accept(seq, [tok], on_device=True)

    def _prefill_chunk(self, seq: Sequence) -> None:
        eng = self.engine
        # On a GPU, alone, a prompt runs in longer passes (nobody waits for them). On the CPU the path does not
        # depend on what else runs, so a request's tokens are the same alone or in company, bit for bit (the
        # tests check it).
        alone = eng.is_cuda and not self.running
        chunk = eng.config.prefill_chunk * (ALONE_CHUNKS if alone else 1)
        if seq.pos3 is None:  # first chunk: prefix-cache lookup, positions, embeddings
            seq.pos3, seq.delta = eng.prompt_positions(seq.inputs)
            start = self._reuse_prefix(seq)
            seq.filled = start
            seq.embeds = eng.prompt_embeds(seq.inputs, start, seq.digests, self.cache)
        if seq.embeds is not None:
            end = min(seq.n_prompt, seq.filled + chunk)
            base = seq.n_prompt - seq.embeds.shape[0]
            seg = Segment(seq.row, seq.embeds[seq.filled - base : end - base], seq.pos3[:, seq.filled : end],
                          seq.filled, "last" if end == seq.n_prompt else None)
            logits = eng.extend([seg])[0]
        seq.filled = end
        if end < seq.n_prompt:
            eng.park_row(seq.row, end)
            return
        self.prefilling.popleft()
        seq.embeds = None
        if self.cache is not None and self.cache.enabled:
            self._store(seq, seq.n_prompt)
        tok = eng.sample_rows(logits, [seq.row])[0]
        if seq.speculate:
            seq.index = NgramIndex(seq.ids)
        self.running[seq.row] = seq
        self._accept(seq, [tok])

    def _verify(self, drafts: dict[int, list[int]]) -> None:
        eng = self.engine
        logits: dict[int, torch.Tensor] = {}
        segs = []
        for row, d in drafts.items():
            seq = self.running[row]
            lg = eng.verify_logits(row, [seq.pending, *d], seq.filled, seq.filled + seq.delta)
            if lg is not None:
                logits[row] = lg
                continue
            toks = torch.tensor([seq.pending, *d], device=eng.device)
            pos = torch.arange(len(d) + 1, device=eng.device) + seq.filled + seq.delta
            segs.append(Segment(row, torch.nn.functional.embedding(toks, eng.embed), pos.expand(3, -1), seq.filled, "all"))
        if segs:  # one multi-token pass for every row the decode-step path does not cover
            logits.update(zip((s.row for s in segs), eng.extend(segs)))
        self.steps += 1
        for row, d in drafts.items():
            lg = logits[row]
            seq = self.running[row]
            p = seq.params
            new, kept = verify(lg, d, eng._seen[row], p.greedy, p.temperature, p.top_k, p.top_p, p.repetition_penalty)
            seq.drafted += len(d)
            seq.accepted += kept
            seq.verify_steps += 1
            self.spec_steps += 1
            self.spec_tokens += len(new)
            seq.filled += 1 + kept  # the pending token and the kept drafts are now in the cache
            self._accept(seq, new)

    def _accept(self, seq: Sequence, new: list[int], on_device: bool = False) -> None:
        """Hand new tokens to the request (up to a stop token or its length) and finish it or keep it going.
        ``on_device``: the decode step already advanced the row's state on the device."""
        out = []
        for t in new:
            out.append(t)
            if t in seq.eos or seq.generated + len(out) >= seq.params.max_new_tokens:
                break
        if seq.first_token_s is None:
            seq.first_token_s = time.perf_counter() - seq.started
        seq.generated += len(out)
        seq.ids.extend(out)
        if seq.index is not None:
            seq.index.extend(out)
        seq.emit(out)
        if out[-1] in seq.eos or seq.generated >= seq.params.max_new_tokens or seq.cancelled():
            self._finish(seq, cancelled=seq.cancelled() and out[-1] not in seq.eos)
            return
        seq.pending = out[-1]
        if not on_device:
            self.engine.set_row(seq.row, seq.pending, seq.filled, seq.filled + seq.delta, out)

    # -- prefix cache ----------------------------------------------------------------------------
    def _keys(self, seq: Sequence, n: int) -> list[bytes]:
        assert self.cache is not None
        if seq.digests is None:
            for key in ("pixel_values", "pixel_values_videos"):  # hashed on the device, where prefill needs them too
                if seq.inputs.get(key) is not None:
                    seq.inputs[key] = seq.inputs[key].to(self.engine.device)
            seq.digests = media_digests(seq.inputs)
        spans = media_spans(seq.ids[: seq.n_prompt], self.engine.image_token_id)
        return self.cache.keys(seq.ids[:n], spans, seq.digests)

    def _reuse_prefix(self, seq: Sequence) -> int:
        """Copy the longest cached prefix of the prompt into the row (leaving at least one token to run)."""
        if self.cache is None or not self.cache.enabled:
            return 0
        blocks = self.cache.match(self._keys(seq, seq.n_prompt), seq.n_prompt - 1)
        n = len(blocks) * self.cache.block
        self.cache.record(seq.n_prompt, n)
        seq.cached_tokens = n
        if n:
            kc, vc = self.engine.k_cache, self.engine.v_cache
            kc[:, seq.row, :, :n].copy_(torch.cat([k for k, _ in blocks], dim=2))
            vc[:, seq.row, :, :n].copy_(torch.cat([v for _, v in blocks], dim=2))
        return n

    def _store(self, seq: Sequence, n: int) -> None:
        assert self.cache is not None
        keys = self._keys(seq, n)
        if keys:
            self.cache.insert(keys, self.engine.k_cache[:, seq.row], self.engine.v_cache[:, seq.row])

    # -- leaving ---------------------------------------------------------------------------------
    def _release(self, seq: Sequence) -> bool:
        """Take a request out of the batch and free its row (False if it was not in it)."""
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        elif self.running.get(seq.row) is seq:
            del self.running[seq.row]
        else:
            return False
        self.free.append(seq.row)
        self.free.sort()
        if seq.seed is not None:
            self.exclusive = False
        return True

    def _finish(self, seq: Sequence, cancelled: bool) -> None:
        was_running = self.running.get(seq.row) is seq
        if not self._release(seq):
            return
        if was_running and self.cache is not None and self.cache.enabled and not cancelled:
            self._store(seq, seq.filled)  # prompt and answer: the next turn of this conversation starts so
        seq.finish({"cancelled": cancelled, "cached_tokens": seq.cached_tokens, "prefill_s": seq.first_token_s,
                    "drafted": seq.drafted, "accepted": seq.accepted, "verify_steps": seq.verify_steps})

    def fail_all(self, error: Exception, report: Callable[[Sequence, Exception], None]) -> None:
        """After an engine error: tell every request and free every row."""
        for seq in [*self.prefilling, *self.running.values()]:
            report(seq, error)
        self.prefilling.clear()
        self.running.clear()
        self.free = list(range(self.engine.config.max_batch))
        self.exclusive = False

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {"running": len(self.running), "prefilling": len(self.prefilling),
                                 "spec_steps": self.spec_steps, "spec_tokens": self.spec_tokens,
                                 "spec_tokens_per_step": self.spec_tokens / self.spec_steps if self.spec_steps else 0.0}
        if self.cache is not None:
            s = self.cache.stats
            out.update(prefix_hit_rate=s.hit_rate, prefix_cached_tokens=s.cached_tokens,
                       prefix_prompt_tokens=s.prompt_tokens, prefix_blocks=self.cache.cached_blocks,
                       prefix_bytes=self.cache.used_bytes)
        return out

"""The local backend: GLM-4.6V through Hugging Face transformers, on one inference thread.

One thread owns the model (CUDA graphs and caches keep thread-local state); callers hand it jobs
through a queue and read token ids back through a per-job queue. Media processing and validation run
on the caller's thread, before the job is queued, so a bad request never reaches the GPU. The caller
side turns token ids into text incrementally (keeping special tokens, which the output parser needs) and
hands it to the chunk assembler (``stream.py``), like every backend. Cancelling (an event, or closing the
iterator) stops generation at the next token.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import OrderedDict
import time
from typing import Any, Iterator

from ..errors import ContextLengthError, GlmvError, ModelLoadError
from ..loading import Log, _stderr_log, choose_placement, load_checkpoint, resolve_model
from ..prompts import template_videos, to_template_messages, validate_messages
from ..settings import SamplingParams, Settings, tuning_dir
from .base import BackendBase, Chunk, GenerationRequest
from .mixed_media import separate_image_and_video_tokens
from .scheduler import BatchStreamer, CancelCriteria, Job, Scheduler, collate, hf_generate_kwargs
from .stream import ChunkAssembler, IncrementalDecoder


WITHDRAW_POLL_S = 0.1  # how often a waiting caller checks whether its request was cancelled
IMAGE_CACHE_SIZE = 8  # processed images kept for the next turn about the same image
SPECULATE_MIN_CHARS = 400  # a prompt text this long (code, a page, an earlier transcript) turns speculation on


class LocalBackend(BackendBase):
    """Runs a checkpoint in this process. ``load()`` is explicit so front ends can show progress."""

    name = "local"

    def __init__(self, settings: Settings, log: Log = _stderr_log, max_batch: int = 8) -> None:
        self.settings = settings
        self._log = log
        self.processor: Any = None
        self.model: Any = None
        self.model_path: Any = None
        self.placement: Any = None
        self.scheduler = Scheduler(max_batch)  # the queue and the inference thread
        self._image_cache: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()
        self._image_lock = threading.Lock()
        self.engine: Any = None
        self.batcher: Any = None  # continuous batching over the fast engine (glmv.engine.scheduler)
        self.warmup_s = 0.0
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
            # The name first, before choose_placement imports torch (seconds): a typo or an unreachable hub is
            # reported at once. A download waits until the placement is known to work (--int4 without CUDA).
            path = resolve_model(self.settings.model, self._log, download=False)
            placement = choose_placement(self.settings)
            path = path or resolve_model(self.settings.model, self._log)
            self._log(f"loading {self.settings.model} ({placement.describe()}) ...")
            processor, model = load_checkpoint(path, placement, self.settings.model, self._log)
            self._attach(processor, model, placement, path)
        return self

    @classmethod
    def from_model(cls, model: Any, processor: Any, settings: Settings, log: Log = _stderr_log,
                   max_batch: int = 8) -> "LocalBackend":
        """A backend around a model already in memory (built in code, or spread over GPUs by hand)."""
        from ..loading import Placement

        backend = cls(settings, log=log, max_batch=max_batch)
        device = next(model.parameters()).device
        placement = Placement(device="cuda" if device.type == "cuda" else "cpu", dtype=model.dtype)
        with backend._load_lock:
            backend._attach(processor, model, placement, None)
        return backend

    def _attach(self, processor: Any, model: Any, placement: Any, path: Any) -> None:
        self.processor, self.model = processor, model
        self.model_path, self.placement = path, placement
        separate_image_and_video_tokens(model)  # an image and a video in one prompt
        self.default_sampling = self._checkpoint_sampling(self.settings.sampling)
        self._start_engine()
        self.scheduler.start(self)

    def _start_engine(self) -> None:
        """Use the fast decode engine where it applies (CUDA, dense bf16 model) unless told otherwise."""
        choice = self.settings.engine
        if choice == "hf" or (choice == "auto" and not str(self.placement.device).startswith("cuda")):
            return
        from ..engine.fast import EngineConfig, FastEngine, unsupported_reason

        reason = unsupported_reason(self.model)
        if reason is not None:
            if choice == "fast":
                raise ModelLoadError(f"--engine fast cannot run this model: {reason}")
            self._log(f"using transformers generate ({reason})")
            return
        t0 = time.perf_counter()
        self._log("warming up the fast decode engine (static KV cache, CUDA graphs) ...")
        max_batch, max_seq_len = self._cache_size()
        cfg = EngineConfig(max_batch=max_batch, max_seq_len=max_seq_len, tune=self.settings.tune,
                           tuning_dir=tuning_dir())
        self._log(f"KV cache: {max_batch} x {max_seq_len} tokens")
        self.engine = FastEngine(self.model, cfg, log=lambda m: None)
        self.engine.capture()
        self._warmup()
        from ..engine.prefix_cache import PrefixCache
        from ..engine.scheduler import Batcher

        budget = self._prefix_budget()
        self.batcher = Batcher(self.engine, PrefixCache(cfg.prefix_block, budget, self.engine.kv_bytes_per_token))
        self.warmup_s = time.perf_counter() - t0
        self._log(f"prefix cache: {budget / 1e9:.2f} GB")
        self._log(f"fast engine ready in {self.warmup_s:.1f} s")

    def _cache_size(self) -> tuple[int, int]:
        """Rows and tokens per row of the engine's KV cache: the settings' sizes, shrunk to what the GPU has
        free (keeping room for prefill), so a 4-bit model still fits a 10 GB card."""
        import torch

        tc = getattr(self.model.config, "text_config", self.model.config)
        head_dim = tc.hidden_size // tc.num_attention_heads
        per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * 2  # K and V, bf16
        rows, seq = self.max_batch, self.settings.max_seq_len
        try:
            free = torch.cuda.mem_get_info(next(self.model.parameters()).device)[0]
        except Exception:  # not CUDA: sizes as configured
            return rows, seq
        budget = max(0, free - int(1.5e9))  # prefill activations and the vision tower need room too
        while rows > 1 and rows * seq * per_token > budget:
            rows //= 2
        while seq > 4096 and rows * seq * per_token > budget:
            seq //= 2
        return rows, seq

    def _prefix_budget(self) -> int:
        """Bytes for the prefix cache: as configured, else half of what the GPU has free after the engine's
        own cache (keeping 2 GB for prefill and the vision tower), at most 16 GB; 256 MB on the CPU."""
        import torch

        if self.settings.prefix_cache_gb is not None:
            return int(self.settings.prefix_cache_gb * 1e9)
        try:
            free = torch.cuda.mem_get_info(next(self.model.parameters()).device)[0]
        except Exception:  # not CUDA
            return 256 * 2**20
        return int(min(16e9, max(0.0, (free - 2e9) / 2)))

    def _warmup(self) -> None:
        """One short generation with an image, so the first real request pays no one-time costs (the vision
        tower's and prefill's first calls, kernel compilation)."""
        from PIL import Image

        from ..engine.fast import GREEDY

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe this image"}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image = Image.new("RGB", (1288, 728), (128, 128, 128))  # screenshot-sized: the common first request
        inputs = dict(self.processor(text=[text], images=[image], return_tensors="pt", **self._image_device()))
        inputs.pop("token_type_ids", None)
        if not self.engine.fits([inputs], 4):  # a tiny cache (tests): warm up on text alone
            inputs = dict(self.processor(text=["[gMASK]<sop><|user|>\nhi<|assistant|>"], return_tensors="pt"))
            inputs.pop("token_type_ids", None)
        self.engine.generate([inputs], GREEDY, 4, lambda ids: False)

    def _image_device(self) -> dict[str, str]:
        """Resize and normalise images on the GPU when the model is on one (~2 ms instead of ~14 ms on the
        CPU for a 1288x728 screenshot, same pixels; transformers' torchvision image processors take it)."""
        return {"device": "cuda"} if str(getattr(self.placement, "device", "")).startswith("cuda") else {}

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
        self.scheduler.stop()
        self.model = None
        self.processor = None
        self.engine = None
        self.batcher = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    @property
    def context_length(self) -> int | None:
        if self.model is None:
            return None
        cfg = self.model.config
        text_cfg = getattr(cfg, "text_config", cfg)
        return int(getattr(text_cfg, "max_position_embeddings", 131072))

    def _context(self) -> int:
        limit = self.context_length
        assert limit is not None, "the model is loaded before requests are prepared"
        return limit

    @property
    def queue_depth(self) -> int:
        """Requests waiting or running."""
        return self.scheduler.queue_depth

    @property
    def max_batch(self) -> int:
        """Requests decoded together at most (the fast engine's cache rows are sized from it when it starts)."""
        return self.scheduler.max_batch

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        self.scheduler.max_batch = value

    @property
    def batch_sizes(self) -> Any:
        """Recent batch sizes (for metrics and tests)."""
        return self.scheduler.batch_sizes

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
        videos = template_videos(request.messages)
        kwargs: dict[str, Any] = {}
        if videos:
            kwargs = {"videos": [v.frames for v in videos], "video_metadata": [v.metadata for v in videos],
                      "do_sample_frames": False}
        if images:
            kwargs.update(self._image_device())
        try:
            if images and not videos and not self._image_device():  # on a GPU the processor takes ~2 ms anyway
                inputs = self._process_with_cached_images(prompt, images)
            else:
                inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt", **kwargs)
        except Exception as exc:
            raise GlmvError(f"cannot prepare the prompt: {exc}") from None
        inputs = dict(inputs)
        inputs.pop("token_type_ids", None)
        n_prompt = int(inputs["input_ids"].shape[1])
        limit = self._context()
        if n_prompt >= limit:
            raise ContextLengthError(
                f"the prompt is {n_prompt} tokens (text plus images) but the model's context is {limit}: "
                f"use fewer pages (--pages), a lower resolution (--max-pixels, --pdf-long-side), a shorter video, "
                f"or a shorter prompt"
            )
        return inputs, prompt

    def _process_with_cached_images(self, prompt: str, images: list[Any]) -> dict[str, Any]:
        """The processor's output for a prompt with images, each image's pixels processed once and kept (the
        last ``IMAGE_CACHE_SIZE``): every turn of a chat about a screenshot sends it again, and on the CPU
        resizing and normalising it costs more than the whole cached prefill of a follow-up. Same tensors as
        one processor call: the text gets each image's placeholder repeated once per visual token, as the
        processor itself expands it."""
        import torch

        processed = []
        for image in images:
            key = (image.size, image.mode, hashlib.sha1(image.tobytes()).digest())
            with self._image_lock:
                hit = self._image_cache.get(key)
                if hit is not None:
                    self._image_cache.move_to_end(key)
            if hit is None:
                out = self.processor.image_processor(images=[image], return_tensors="pt")
                hit = (out["pixel_values"], out["image_grid_thw"])
                with self._image_lock:
                    self._image_cache[key] = hit
                    while len(self._image_cache) > IMAGE_CACHE_SIZE:
                        self._image_cache.popitem(last=False)
            processed.append(hit)
        token = self.processor.image_token
        parts = prompt.split(token)
        if len(parts) != len(images) + 1:  # not the layout we expand: let the processor do all of it
            return self.processor(text=[prompt], images=images, return_tensors="pt")
        merge = self.processor.image_processor.merge_size ** 2
        text = parts[0] + "".join(token * int(grid.prod() // merge) + rest for (_, grid), rest in zip(processed, parts[1:]))
        inputs = dict(self.processor.tokenizer([text], return_tensors="pt"))
        inputs["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(inputs["input_ids"].tolist()))
        inputs["pixel_values"] = torch.cat([pv for pv, _ in processed])
        inputs["image_grid_thw"] = torch.cat([grid for _, grid in processed])
        return inputs

    def serving_stats(self) -> dict[str, float]:
        """Prefix-cache and speculation counters of the fast engine (empty without it)."""
        return self.batcher.stats() if self.batcher is not None else {}

    def hf_generate(self, live: list[Job], streamer: BatchStreamer) -> None:
        """transformers' own generate: the CPU path, quantized and multi-GPU models, very long prompts."""
        import torch

        inputs = collate([j.inputs for j in live], self.processor.tokenizer.pad_token_id)
        device = self.model.device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(self.model.dtype)
        if live[0].seed is not None:
            torch.manual_seed(live[0].seed)
        with torch.inference_mode():
            self.model.generate(
                **inputs,
                **hf_generate_kwargs(live[0].sampling, live[0].max_new_tokens),
                streamer=streamer,
                stopping_criteria=[CancelCriteria([j.cancel for j in live])],
            )

    # -- public API ----------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        t0 = time.perf_counter()
        inputs, prompt = self.prepare(request)  # raises before any GPU work
        n_prompt, limit = int(inputs["input_ids"].shape[1]), self._context()
        if request.exact_max_tokens and n_prompt + request.sampling.max_new_tokens > limit:
            raise ContextLengthError(
                f"max_tokens is too large: the prompt is {n_prompt} tokens and the model's context is {limit}, "
                f"so at most {limit - n_prompt} new tokens fit (asked for {request.sampling.max_new_tokens}): "
                f"lower max_tokens or shorten the prompt"
            )
        return self._stream(request, inputs, prompt, cancel or threading.Event(), t0)

    def _stream(
        self, request: GenerationRequest, inputs: dict[str, Any], prompt: str, cancel: threading.Event, t0: float
    ) -> Iterator[Chunk]:
        sampling = request.sampling
        n_prompt = int(inputs["input_ids"].shape[1])
        max_new = min(sampling.max_new_tokens, self._context() - n_prompt)
        eos = self.eos_ids()
        job = Job(inputs=inputs, sampling=sampling, max_new_tokens=max_new, cancel=cancel, seed=sampling.seed,
                  speculate=self._speculate(request))
        ahead = self.scheduler.submit(job)
        decoder = IncrementalDecoder(self.processor.tokenizer)
        out = ChunkAssembler(prompt_tokens=n_prompt, max_new_tokens=max_new, stops=sampling.stop, tools=request.tools,
                             thinking_open=prompt.rstrip().endswith("<think>"), t0=t0)
        last_id: int | None = None
        finished = False
        try:
            if ahead:
                yield Chunk("status", text=f"waiting: {ahead} request(s) ahead")
            while True:
                try:
                    kind, payload = job.out.get(timeout=WITHDRAW_POLL_S)
                except queue.Empty:
                    if not (cancel.is_set() and self.scheduler.withdraw(job)):
                        continue
                    # cancelled while still queued: it leaves the queue and never reaches the model
                    kind, payload = "done", {"cancelled": True, "prefill_s": None,
                                             "queued_s": time.perf_counter() - job.queued_at}
                if kind == "tokens":
                    last_id = payload[-1]
                    yield from out.push(decoder.push([i for i in payload if i not in eos]), tokens=len(payload))
                    if out.stopped:
                        cancel.set()  # a stop string: the inference thread drops the row at its next token
                elif kind == "error":
                    raise payload
                else:  # done
                    yield from out.push(decoder.flush())
                    out.timings.prefill_s = payload["prefill_s"]
                    out.timings.queued_s = payload["queued_s"]
                    usage = out.usage
                    usage.cached_tokens = payload.get("cached_tokens", 0)
                    usage.accepted_prediction_tokens = payload.get("accepted", 0)
                    usage.rejected_prediction_tokens = payload.get("drafted", 0) - payload.get("accepted", 0)
                    usage.speculative_steps = payload.get("verify_steps", 0)
                    ended = "cancelled" if payload["cancelled"] else "stop" if last_id in eos else None
                    finished = True
                    yield from out.done(ended)
                    return
        finally:
            if not finished:
                cancel.set()  # the caller went away: free the inference thread at the next token
                self.scheduler.withdraw(job)  # or, still queued, leave the queue now

    def _speculate(self, request: GenerationRequest) -> bool:
        """Whether to draft from the prompt: asked for, or (auto) the conversation carries text the answer is
        likely to copy: an earlier answer (a re-run, an edit) or a long text part (HTML or code to revise)."""
        if request.speculate is not None:
            return request.speculate
        mode = self.settings.speculate
        if mode != "auto":
            return mode == "on"
        for m in request.messages:
            texts = [c for c in m.content if isinstance(c, str)]
            if (m.role == "assistant" and texts) or any(len(t) >= SPECULATE_MIN_CHARS for t in texts):
                return True
        return False

    def eos_ids(self) -> set[int]:
        gc = getattr(self.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None)
        if eos is None:
            eos = self.processor.tokenizer.eos_token_id
        return set(eos if isinstance(eos, (list, tuple)) else [eos])


__all__ = ["LocalBackend", "IncrementalDecoder"]

"""The fast generation path: the vision tower through transformers, the text decoder through our own steps.

The vision tower runs through the model's own modules (on CUDA its blocks replayed as one graph per image
size, :mod:`glmv.engine.vision`); the prompt (multimodal rope included) runs through
this engine's multi-token forward, which writes its keys/values into a static KV cache that the engine
owns. Each decode step runs the text decoder from the same weights with cuBLAS matrix products and the fused
Triton kernels of :mod:`glmv.engine.kernels`; sampling (repetition penalty, temperature, top-k, top-p)
happens inside the step, on the GPU. On CUDA the step is captured once per batch size as a CUDA graph,
so decoding a token is one graph replay and one 8-byte copy to the host.

The KV cache is one pool of rows (``max_batch`` x ``max_seq_len``). Rows are independent: a decode step
advances only the rows marked active, so requests can join and leave between steps (continuous
batching, driven by :mod:`glmv.engine.scheduler`). Prompts and drafted tokens go through
:meth:`FastEngine.extend`, a multi-token forward over the same fused weights that writes into any row at
any offset: it runs prefill in chunks (after a prefix-cache hit, only the uncached tail) and verifies
speculative drafts in one pass.

Works for the dense GLM-4.6V-Flash text decoder (``glm4v``) on one GPU in bf16/fp16, or with its
linear layers in glmv's int4 format (:mod:`glmv.engine.w4`). Anything else (bitsandbytes weights, the MoE
model, several GPUs) uses transformers' ``generate``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from ..settings import DEFAULT_MAX_SEQ_LEN, SamplingParams
from .gemv import GemvTuner, tuner_cache_file
from .kernels import Kernels, install_fused_norms, rotate_pairs_cs
from .vision import GraphedVision
from .vision import supported as vision_supported
from .w4 import W4Linear, dequantize_w4, w4_linear

if TYPE_CHECKING:  # the scheduler imports this module; at run time the engine imports it lazily
    from .scheduler import RowParams, Segment

W4_KERNEL_ROWS = 32  # the int4 kernels serve up to this many rows (decode, drafts); longer inputs dequantize
TOPK_CAP = 256  # candidates kept for top-k/top-p sampling (top_k=0 means "all": approximated by these)
ALONE_CHUNKS = 4  # with no other request decoding, prefill runs in passes this many chunks long
# Plain greedy decoding (no repetition penalty): warm-up, benchmarks and correctness checks
GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0)
SHORT_SEGMENT = 64  # on CUDA, extend segments after cached tokens up to this long attend through the decode kernel


@dataclass
class EngineConfig:
    max_batch: int = 8
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    use_graphs: bool = True
    use_triton: bool = True
    n_splits: int = 16
    prefill_chunk: int = 512  # prompt tokens per prefill pass: the longest a decoding row waits for a newcomer
    prefix_block: int = 32  # tokens per prefix-cache block
    prefix_cache_bytes: int | None = None  # prefix-cache budget (None: decided by the caller; 0: off)
    spec_tokens: int = 8  # prompt-lookup draft length
    tune: bool = True  # time cuBLAS against Triton GEMV per shape; from Settings.tune
    tuning_dir: Path | None = None  # where the tuned choices are cached (settings.tuning_dir(); None: not kept)


@dataclass
class _W4:
    """int4 weights of one (possibly fused) projection."""

    packed: torch.Tensor
    scale: torch.Tensor
    mn: torch.Tensor


@dataclass
class _Layer:
    wqkv: Any  # torch.Tensor (bf16) or _W4
    bqkv: torch.Tensor | None
    wo: Any
    w_gate_up: Any
    w_down: Any
    in_norm: torch.Tensor
    post_self_attn_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    post_mlp_norm: torch.Tensor


def unsupported_reason(model: Any) -> str | None:
    """Why the fast path cannot run this model (None if it can)."""
    if getattr(model.config, "model_type", "") not in ("glm4v", "glm46v"):
        return f"model type {model.config.model_type!r} (the fast path covers the dense glm4v decoder)"
    devices = set(getattr(model, "hf_device_map", {}).values()) if getattr(model, "hf_device_map", None) else set()
    if len(devices) > 1:
        return "the model is spread over several devices"
    try:
        lm = model.model.language_model
        q_proj = lm.layers[0].self_attn.q_proj
        w = q_proj.weight
    except AttributeError:
        return "unexpected module layout"
    if isinstance(q_proj, W4Linear):
        return None
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32) or hasattr(w, "quant_state"):
        return f"quantized weights ({type(w).__name__})"
    return None


class FastEngine:
    def __init__(self, model: Any, config: EngineConfig | None = None, log: Callable[[str], None] = lambda m: None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"fast engine unavailable: {reason}")
        self.model = model
        self.config = config or EngineConfig()
        self.log = log
        tc = model.config.text_config
        lm = model.model.language_model
        self.device = lm.embed_tokens.weight.device
        self.dtype = lm.embed_tokens.weight.dtype
        self.n_heads = tc.num_attention_heads
        self.n_kv = tc.num_key_value_heads
        self.head_dim = tc.hidden_size // tc.num_attention_heads
        self.eps = tc.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.vocab = model.lm_head.weight.shape[0]
        self.is_cuda = self.device.type == "cuda"
        self.kernels = Kernels(use_triton=self.config.use_triton and self.is_cuda)
        self.use_graphs = self.config.use_graphs and self.is_cuda
        if self.kernels.use_triton:
            install_fused_norms(model)  # prefill runs the model's own forward: fuse its ~200 RMSNorms
        self.layers = [self._fuse(layer) for layer in lm.layers]
        self.tuner = None
        if self.kernels.use_triton and self.config.tune:  # the file is named after the GPU: only on one
            tdir = self.config.tuning_dir
            self.tuner = GemvTuner(tuner_cache_file(self.device, tdir) if tdir is not None else None)
        self.final_norm = lm.norm.weight
        self.lm_head = model.lm_head.weight
        self.embed = lm.embed_tokens.weight
        self.inv_freq = lm.rotary_emb.inv_freq.detach().float().to(self.device)
        n_layers = len(self.layers)
        shape = (n_layers, self.config.max_batch, self.n_kv, self.config.max_seq_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        b = self.config.max_batch
        self._tokens = torch.zeros(b, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(b, dtype=torch.long, device=self.device)
        self._write_idx = torch.zeros(b, dtype=torch.int32, device=self.device)
        self._seq_lens = torch.ones(b, dtype=torch.int32, device=self.device)
        self._seen = torch.zeros(b, self.vocab, dtype=torch.bool, device=self.device)
        self._temp = torch.ones(b, device=self.device)
        self._top_k = torch.zeros(b, dtype=torch.long, device=self.device)
        self._top_p = torch.ones(b, device=self.device)
        self._rep = torch.ones(b, device=self.device)
        self._greedy = torch.zeros(b, dtype=torch.bool, device=self.device)
        self._active = torch.ones(b, dtype=torch.bool, device=self.device)  # rows a decode step advances
        self._active_key: tuple | None = None  # (bucket, rows) that _active holds, set by decode()
        self._out = torch.zeros(b, dtype=torch.long, device=self.device)
        self._host_out = torch.zeros(b, dtype=torch.long, pin_memory=self.is_cuda)
        self._graphs: dict[int, Any] = {}
        self._pool: Any = None
        # draft verification through the decode step: tokens and positions, then write slots and lengths
        t = self.config.spec_tokens + 1
        self._vt = torch.zeros(2, t, dtype=torch.long, device=self.device)
        self._vt_i32 = torch.ones(2, t, dtype=torch.int32, device=self.device)
        self._verify_graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        self.kv_bytes_per_token = 2 * n_layers * self.n_kv * self.head_dim * self.k_cache.element_size()
        # multimodal rope: which of the (temporal, height, width) positions drives each rotary frequency
        rope = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
        section = list(rope.get("mrope_section") or [self.inv_freq.shape[0]])
        comp = [i % 3 for i, n in enumerate(section) for _ in range(n)]
        if len(comp) != self.inv_freq.shape[0]:
            comp = [0] * self.inv_freq.shape[0]
        self._rope_comp = torch.tensor(comp, dtype=torch.long, device=self.device)
        self.image_token_id = getattr(model.config, "image_token_id", None)
        # the vision tower's blocks as one CUDA graph per image size (the rest of the tower runs eagerly)
        visual = getattr(model.model, "visual", None)
        self.vision: GraphedVision | None = None
        if self.use_graphs and visual is not None and vision_supported(visual):
            self.vision = GraphedVision(visual, lambda: self._pool, self._set_pool)

    # -- weights -------------------------------------------------------------------------------
    def _fuse(self, layer: Any) -> _Layer:
        attn = layer.self_attn
        if isinstance(attn.q_proj, W4Linear):
            return self._fuse_w4(layer)
        with torch.no_grad():
            parts = [attn.q_proj, attn.k_proj, attn.v_proj]
            wqkv = torch.cat([p.weight for p in parts]).contiguous()
            bqkv = torch.cat([p.bias for p in parts]).contiguous() if attn.q_proj.bias is not None else None
            # Point the modules at views of the fused tensors: prefill keeps working, no second copy.
            start = 0
            for p in parts:
                n = p.weight.shape[0]
                p.weight = torch.nn.Parameter(wqkv[start : start + n], requires_grad=False)
                if bqkv is not None:
                    p.bias = torch.nn.Parameter(bqkv[start : start + n], requires_grad=False)
                start += n
        return _Layer(
            wqkv=wqkv,
            bqkv=bqkv,
            wo=attn.o_proj.weight,
            w_gate_up=layer.mlp.gate_up_proj.weight,
            w_down=layer.mlp.down_proj.weight,
            in_norm=layer.input_layernorm.weight,
            post_self_attn_norm=layer.post_self_attn_layernorm.weight,
            post_attention_norm=layer.post_attention_layernorm.weight,
            post_mlp_norm=layer.post_mlp_layernorm.weight,
        )

    def _fuse_w4(self, layer: Any) -> _Layer:
        attn = layer.self_attn
        parts = [attn.q_proj, attn.k_proj, attn.v_proj]
        fused = {name: torch.cat([getattr(p, name) for p in parts]).contiguous() for name in ("packed", "scale", "mn")}
        bias = torch.cat([p.bias for p in parts]).contiguous() if attn.q_proj.bias is not None else None
        start = 0
        for p in parts:  # the modules keep working for prefill, as views of the fused buffers
            n = p.packed.shape[0]
            for name, t in fused.items():
                setattr(p, name, t[start : start + n])
            if bias is not None:
                p.bias = torch.nn.Parameter(bias[start : start + n], requires_grad=False)
            start += n

        def w4(m: W4Linear) -> _W4:
            return _W4(m.packed, m.scale, m.mn)

        return _Layer(
            wqkv=_W4(fused["packed"], fused["scale"], fused["mn"]),
            bqkv=bias,
            wo=w4(attn.o_proj),
            w_gate_up=w4(layer.mlp.gate_up_proj),
            w_down=w4(layer.mlp.down_proj),
            in_norm=layer.input_layernorm.weight,
            post_self_attn_norm=layer.post_self_attn_layernorm.weight,
            post_attention_norm=layer.post_attention_layernorm.weight,
            post_mlp_norm=layer.post_mlp_layernorm.weight,
        )

    def _linear(self, x: torch.Tensor, w: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(w, _W4) and x.shape[0] > W4_KERNEL_ROWS:  # a prefill chunk: dequantize once, as W4Linear does
            return F.linear(x, dequantize_w4(w.packed, w.scale, w.mn, x.dtype), bias)
        if isinstance(w, _W4):
            if self.tuner is not None:
                return self.tuner.w4_linear(x, w, bias)
            return w4_linear(x, w.packed, w.scale, w.mn, bias)
        if self.tuner is not None and x.shape[0] == 1:
            return self.tuner.linear(x, w, bias)
        return F.linear(x, w, bias)

    def _mlp(self, y: torch.Tensor, lw: _Layer) -> torch.Tensor:
        gu = self._linear(y, lw.w_gate_up)
        if isinstance(lw.w_down, _W4):
            return self._linear(self.kernels.silu_mul(gu), lw.w_down)
        if self.tuner is not None and gu.shape[0] == 1:
            return self.tuner.linear(gu, lw.w_down, silu=True)
        return F.linear(self.kernels.silu_mul(gu), lw.w_down)

    def tune(self, rows: int = 1) -> float:
        """Pick the fastest product for each weight shape at this batch size (timed once per GPU, then
        cached): for bf16 weights at batch 1 cuBLAS or a Triton GEMV, for int4 weights the block sizes."""
        t0 = time.perf_counter()
        if self.tuner is None:
            return 0.0
        lw = self.layers[0]
        if isinstance(lw.wqkv, _W4):
            self.tuner.tune_w4(lw.wqkv, lw.bqkv, rows)
            self.tuner.tune_w4(lw.wo, rows=rows)
            self.tuner.tune_w4(lw.w_gate_up, rows=rows)
            self.tuner.tune_w4(lw.w_down, rows=rows)
        if rows > 1:
            self.tuner.save()
            return time.perf_counter() - t0
        if not isinstance(lw.wqkv, _W4):
            self.tuner.tune(lw.wqkv, lw.bqkv)
            self.tuner.tune(lw.wo)
            self.tuner.tune(lw.w_gate_up)
            self.tuner.tune(lw.w_down, silu=True)
        self.tuner.tune(self.lm_head)
        self.tuner.save()
        return time.perf_counter() - t0

    # -- one decode step ---------------------------------------------------------------------
    def _step(self, b: int, row: int | None = None) -> torch.Tensor:
        K = self.kernels
        if row is None:
            tokens, positions = self._tokens[:b], self._positions[:b]
            write_idx, seq_lens = self._write_idx[:b], self._seq_lens[:b]
        else:  # draft verification: b consecutive positions of one row, as b virtual rows sharing its cache
            tokens, positions, write_idx, seq_lens = self._vt[0], self._vt[1], self._vt_i32[0], self._vt_i32[1]
        h = F.embedding(tokens, self.embed)
        y = K.rmsnorm(h, self.layers[0].in_norm, self.eps)
        n = len(self.layers)
        for i, lw in enumerate(self.layers):
            kc, vc = self.k_cache[i], self.v_cache[i]
            if row is not None:  # batch stride 0: every virtual row reads and writes the same cache row
                kc, vc = kc[row : row + 1].expand(b, -1, -1, -1), vc[row : row + 1].expand(b, -1, -1, -1)
            qkv = self._linear(y, lw.wqkv, lw.bqkv)
            q = K.rope_cache(qkv, kc, vc, positions, write_idx, self.inv_freq, self.n_heads, self.n_kv, self.head_dim)
            a = K.decode_attention(q, kc, vc, seq_lens, self.scale, n_splits=self.config.n_splits)
            o = self._linear(a.view(b, -1), lw.wo)
            h, y = K.add_rmsnorm2(h, o, lw.post_self_attn_norm, lw.post_attention_norm, self.eps)
            m = self._mlp(y, lw)
            nxt = self.layers[i + 1].in_norm if i + 1 < n else self.final_norm
            h, y = K.add_rmsnorm2(h, m, lw.post_mlp_norm, nxt, self.eps)
        return self._linear(y, self.lm_head)

    def _sample(self, logits: torch.Tensor, b: int, greedy_only: bool = False) -> torch.Tensor:
        seen, active = self._seen[:b], self._active[:b, None]
        logits = logits.float()
        rep = self._rep[:b, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        greedy_tok = logits.argmax(-1)
        if greedy_only:  # a separate graph for greedy requests skips the top-k machinery
            _mark_seen(seen, greedy_tok, active)
            return greedy_tok
        vals, idx = logits.topk(min(TOPK_CAP, logits.shape[-1]), dim=-1)
        vals = vals / self._temp[:b, None].clamp_min(1e-5)
        ar = torch.arange(vals.shape[-1], device=vals.device)
        k = torch.where(self._top_k[:b] > 0, self._top_k[:b], vals.shape[-1])
        vals = torch.where(ar[None, :] < k[:, None], vals, float("-inf"))
        probs = vals.softmax(-1)
        before = probs.cumsum(-1) - probs
        probs = torch.where(before < self._top_p[:b, None], probs, 0.0)
        race = probs / torch.empty_like(probs).exponential_(1.0)
        sampled = idx.gather(1, race.argmax(-1, keepdim=True)).squeeze(1)
        tok = torch.where(self._greedy[:b], greedy_tok, sampled)
        _mark_seen(seen, tok, active)
        return tok

    def _advance(self, b: int, greedy: bool = False) -> None:
        out = self._sample(self._step(b), b, greedy)
        # rows that are not decoding this step (free, prefilling, verifying a draft) keep their state; the
        # step's write into their next KV slot is overwritten by whatever fills that slot for real
        active = self._active[:b]
        step = active.to(torch.int32)
        self._out[:b].copy_(out)
        self._tokens[:b].copy_(torch.where(active, out, self._tokens[:b]))
        self._positions[:b] += step
        self._write_idx[:b] += step
        self._seq_lens[:b] += step

    def _bucket(self, b: int) -> int:
        size = 1
        while size < b:
            size *= 2
        return min(size, self.config.max_batch)

    def capture(self, sizes: list[int] | None = None) -> float:
        """Warm up and capture CUDA graphs for the given batch sizes (default: batch 1; other sizes are
        captured the first time they are used); returns seconds spent."""
        t0 = time.perf_counter()
        self.tune()
        if not self.use_graphs:
            return time.perf_counter() - t0
        for b in sorted(sizes or [1], reverse=True):
            self._capture_now(self._bucket(b), greedy=False)
        return time.perf_counter() - t0

    def _capture_now(self, b: int, greedy: bool) -> None:
        if (b, greedy) in self._graphs:
            return
        if b > 1:
            self.tune(b)  # int4 block sizes for this batch size (cached on disk after the first time)
        state = (self._positions, self._write_idx, self._seq_lens, self._tokens, self._seen, self._greedy, self._active)
        saved = [t.clone() for t in state]
        # the dummy steps write slots 0..2 of rows < b, which may hold a live request's cache: keep them
        kv_saved = (self.k_cache[:, :b, :, :4].clone(), self.v_cache[:, :b, :, :4].clone())
        self._reset_dummy(b)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self._advance(b, greedy)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            self._advance(b, greedy)
            self._host_out[:b].copy_(self._out[:b], non_blocking=True)
        self._pool = graph.pool()
        self._graphs[(b, greedy)] = graph
        self.log(f"captured decode graph for batch {b}")
        for t, s in zip(state, saved):
            t.copy_(s)
        self.k_cache[:, :b, :, :4].copy_(kv_saved[0])
        self.v_cache[:, :b, :, :4].copy_(kv_saved[1])
        torch.cuda.synchronize()

    def _reset_dummy(self, b: int) -> None:
        self._tokens[:b].zero_()
        self._positions[:b].zero_()
        self._write_idx[:b].zero_()
        self._seq_lens[:b].fill_(1)
        self._seen[:b].zero_()
        self._greedy[:b].fill_(True)
        self._active[:b].fill_(True)
        self._active_key = None

    # -- prompts: positions and embeddings -----------------------------------------------------
    def prompt_positions(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Multimodal rope positions [3, n] of a processed prompt, and the offset of the first position after it
        (``rope_deltas``): cheap, no vision tower."""
        ids = inputs["input_ids"]
        n = int(ids.shape[1])
        grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None}
        if not grids:
            return torch.arange(n, device=self.device).expand(3, n), 0
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = (ids == self.image_token_id).to(torch.int32)
        pos, delta = self.model.model.get_rope_index(ids, mm_token_type_ids=types, **grids)
        return pos[:, 0].to(self.device), int(delta.reshape(-1)[0])

    def _set_pool(self, pool: Any) -> None:
        self._pool = pool

    def _media_features(self, kind: str, pixels: torch.Tensor, grid: torch.Tensor, digests: tuple | None,
                        store: Any = None) -> torch.Tensor:
        """The vision tower's output for all images (or videos) of a prompt [tokens, hidden]; taken from and
        kept in ``store`` (the prefix cache) under their content ``digests`` when both are given."""
        key = (kind, digests) if (digests and store is not None) else None
        if key is not None:
            cached = store.features(key)
            if cached is not None:
                return cached
        mm = self.model.model
        get = mm.get_image_features if kind == "image" else mm.get_video_features
        with self.vision.active() if self.vision is not None else contextlib.nullcontext():
            out = get(pixels.to(self.device, self.dtype), grid.to(self.device), return_dict=True)
        feats = torch.cat(list(out.pooler_output)).to(self.dtype)
        if key is not None:
            store.keep_features(key, feats)
        return feats

    def prompt_embeds(self, inputs: dict[str, Any], start: int = 0, digests: list[bytes] | None = None,
                      store: Any = None) -> torch.Tensor:
        """Input embeddings of prompt tokens ``start:`` [n - start, hidden]; the vision tower runs only for the
        images or videos whose tokens lie in that range (a prefix-cache hit that covers them skips it), and not
        at all for media whose ``digests`` (per image, then per video, as the prefix cache computes them) are
        in ``store`` (the prefix cache's feature store)."""
        ids = inputs["input_ids"][0].to(self.device)
        emb = F.embedding(ids[start:], self.embed)
        placeholder = ids == self.image_token_id
        if not bool(placeholder[start:].any()):
            return emb
        kinds = [(k, g, t) for k, g, t in (("pixel_values", "image_grid_thw", 1), ("pixel_values_videos", "video_grid_thw", 2))
                 if inputs.get(k) is not None]
        if not kinds:
            raise ValueError("the prompt has image placeholder tokens but no image or video inputs")
        types = inputs.get("mm_token_type_ids")
        n_images = len(inputs["image_grid_thw"]) if inputs.get("image_grid_thw") is not None else 0
        for pix, grid, type_id in kinds:
            # images and videos share the placeholder token; with both, the processor's token types tell them apart
            mask = placeholder & (types[0].to(self.device) == type_id) if (types is not None and len(kinds) > 1) else placeholder
            where = mask.nonzero().squeeze(1)
            keep = where >= start
            if not bool(keep.any()):
                continue
            mine = None if digests is None else tuple(digests[:n_images] if type_id == 1 else digests[n_images:])
            feats = self._media_features("image" if type_id == 1 else "video", inputs[pix], inputs[grid], mine, store)
            emb[where[keep] - start] = feats[keep]
        return emb

    # -- multi-token forward: prefill chunks and draft verification --------------------------------
    def _rope_angles(self, pos3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosines and sines [T, 1, rot/2] of the rotary angles at multimodal positions pos3 [3, T]."""
        freqs = pos3.float()[self._rope_comp].T * self.inv_freq[None, :]  # [T, rot/2]
        return freqs.cos()[:, None, :], freqs.sin()[:, None, :]

    @torch.inference_mode()
    def extend(self, segments: list["Segment"]) -> list[torch.Tensor | None]:
        """Run several rows' new tokens through the decoder in one pass: each segment's keys/values are written
        into its row from ``start`` on, and its tokens attend to that row's cache causally. Returns, per
        segment, float logits for the positions it asks for ([T, vocab], [1, vocab], or None)."""
        K = self.kernels
        h = torch.cat([s.embeds for s in segments]).to(self.dtype)
        pos3 = torch.cat([s.pos3.to(self.device) for s in segments], dim=1)
        n_tok = h.shape[0]
        # a segment from slot 0 is plain causal attention (flash kernels apply); later ones see the row's
        # earlier slots through an offset causal mask, or, short ones on CUDA (a follow-up's tail, a draft),
        # through the decode kernel: each token a virtual row of the segment's cache row, seeing up to its slot
        short = [K.use_triton and s.start > 0 and s.length <= SHORT_SEGMENT for s in segments]
        masks = [None if s.start == 0 or sh else
                 torch.ones(s.length, s.start + s.length, dtype=torch.bool, device=self.device).tril(s.start)
                 for s, sh in zip(segments, short)]
        lens = [torch.arange(s.start + 1, s.start + s.length + 1, device=self.device, dtype=torch.int32) if sh else None
                for s, sh in zip(segments, short)]
        y = K.rmsnorm(h, self.layers[0].in_norm, self.eps)
        n, hq, hkv, d = len(self.layers), self.n_heads, self.n_kv, self.head_dim
        cos, sin = self._rope_angles(pos3)  # once for all layers: a short extend is bound by host-side work
        for i, lw in enumerate(self.layers):
            kc, vc = self.k_cache[i], self.v_cache[i]
            x = self._linear(y, lw.wqkv, lw.bqkv).view(n_tok, hq + 2 * hkv, d)
            qk = rotate_pairs_cs(x[:, : hq + hkv], cos, sin)
            q, k = qk[:, :hq], qk[:, hq:]
            v = x[:, hq + hkv :]
            outs, off = [], 0
            for s, mask, seg_lens in zip(segments, masks, lens):
                end = s.start + s.length
                kc[s.row, :, s.start : end] = k[off : off + s.length].transpose(0, 1)
                vc[s.row, :, s.start : end] = v[off : off + s.length].transpose(0, 1)
                if seg_lens is not None:
                    rows = (kc[s.row : s.row + 1].expand(s.length, -1, -1, -1),
                            vc[s.row : s.row + 1].expand(s.length, -1, -1, -1))
                    a = K.decode_attention(q[off : off + s.length].contiguous(), *rows, seg_lens, self.scale,
                                           n_splits=self.config.n_splits)
                    outs.append(a.reshape(s.length, hq * d))
                else:
                    a = F.scaled_dot_product_attention(q[off : off + s.length].transpose(0, 1)[None],
                                                       kc[s.row, :, :end][None], vc[s.row, :, :end][None],
                                                       attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                                       enable_gqa=True)
                    outs.append(a[0].transpose(0, 1).reshape(s.length, hq * d))
                off += s.length
            o = self._linear(torch.cat(outs), lw.wo)
            h, y = K.add_rmsnorm2(h, o, lw.post_self_attn_norm, lw.post_attention_norm, self.eps)
            m = self._mlp(y, lw)
            nxt = self.layers[i + 1].in_norm if i + 1 < n else self.final_norm
            h, y = K.add_rmsnorm2(h, m, lw.post_mlp_norm, nxt, self.eps)
        result: list[torch.Tensor | None] = []
        off = 0
        for s in segments:
            if s.logits == "all":
                result.append(F.linear(y[off : off + s.length], self.lm_head).float())
            elif s.logits == "last":
                result.append(F.linear(y[off + s.length - 1 : off + s.length], self.lm_head).float())
            else:
                result.append(None)
            off += s.length
        return result

    @torch.inference_mode()
    def verify_logits(self, row: int, tokens: list[int], kv_len: int, position: int) -> torch.Tensor | None:
        """Logits [len(tokens), vocab] of a row's pending token and draft, computed by the decode step with the
        draft's positions as virtual rows that share the row's cache (their keys written at ``kv_len`` on, each
        attending causally): the weights are read once, as for one token, and on CUDA it is one graph replay
        per row. None where this path does not apply (no Triton kernels, no room): use :meth:`extend`."""
        t = self._vt.shape[1]
        if not self.kernels.use_triton or len(tokens) > t or kv_len + t > self.config.max_seq_len:
            return None
        ar = torch.arange(t)
        # slots past the draft get throwaway tokens; whatever they write is overwritten before it is read
        self._vt.copy_(torch.stack([torch.tensor(tokens + [0] * (t - len(tokens))), position + ar]))
        self._vt_i32.copy_(torch.stack([kv_len + ar, kv_len + ar + 1]).to(torch.int32))
        if not self.use_graphs:
            return self._step(t, row)[: len(tokens)].float()
        if row not in self._verify_graphs:
            self.tune(t)  # int4 block sizes for this many rows (cached on disk)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up runs compute exactly what the replay will (same slots, same values)
                    self._step(t, row)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._step(t, row)
            self._pool = graph.pool()
            self._verify_graphs[row] = (graph, out)
        graph, out = self._verify_graphs[row]
        graph.replay()
        return out[: len(tokens)].float()

    # -- rows ------------------------------------------------------------------------------------
    def start_row(self, row: int, params: "RowParams", prompt_ids: torch.Tensor) -> None:
        """Set a row's sampling parameters and repetition-penalty history for a new request."""
        self._greedy[row] = params.greedy
        self._temp[row] = params.temperature
        self._top_k[row] = params.top_k
        self._top_p[row] = params.top_p
        self._rep[row] = params.repetition_penalty
        self._seen[row].zero_()
        self._seen[row, prompt_ids.to(self.device)] = True
        self.park_row(row, 0)

    def park_row(self, row: int, slot: int) -> None:
        """Point a row that is not decoding (its prompt still being filled) at ``slot``, the next one its
        prefill writes: the decode steps of the other rows compute this row too, and their throwaway write
        must land where the prefill is about to write, never on keys/values already in place."""
        self._write_idx[row] = slot
        self._seq_lens[row] = slot + 1
        self._positions[row] = slot

    def set_row(self, row: int, token: int, kv_len: int, position: int, new_ids: list[int] | None = None) -> None:
        """Point a row's next decode step at ``token`` (not yet in the cache), written at slot ``kv_len``."""
        self._tokens[row] = token
        self._write_idx[row] = kv_len
        self._positions[row] = position
        self._seq_lens[row] = kv_len + 1
        if new_ids:
            self._seen[row, torch.tensor(new_ids, device=self.device)] = True

    def sample_rows(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """Sample one token per row from [len(rows), vocab] logits with each row's own parameters."""
        b = self._bucket(max(rows) + 1)
        full = torch.zeros(b, logits.shape[-1], device=self.device)
        idx = torch.tensor(rows, device=self.device)
        full[idx] = logits.to(full.device)
        keep = self._active[:b].clone()
        self._active[:b] = False
        self._active[idx] = True
        try:
            tok = self._sample(full, b)
        finally:
            self._active[:b] = keep
        return tok[idx].tolist()

    def decode(self, rows: list[int], greedy: bool | None = None) -> list[int]:
        """One decode step for these rows (the others keep their state); returns one new id per row.
        ``greedy``: every row samples greedily (a cheaper graph); None: look it up on the device."""
        b = self._bucket(max(rows) + 1)
        key = (b, tuple(rows))
        if key != self._active_key:  # a host-to-device copy (and, on CUDA, a wait) only when the rows change
            mask = torch.zeros(b, dtype=torch.bool)
            mask[rows] = True
            self._active[:b].copy_(mask)
            self._active_key = key
        if greedy is None:
            greedy = bool(self._greedy[:b][self._active[:b]].all())
        if self.use_graphs:
            self._capture_now(b, greedy)
            self._graphs[(b, greedy)].replay()
            torch.cuda.current_stream().synchronize()
            out = self._host_out[:b].tolist()
        else:
            self._advance(b, greedy)
            out = self._out[:b].tolist()
        return [out[r] for r in rows]

    # -- generation ------------------------------------------------------------------------------
    def fits(self, rows: list[dict[str, Any]], max_new_tokens: int) -> bool:
        """Whether these prompts and answer length fit the engine's batch and cache sizes."""
        longest = max(int(r["input_ids"].shape[1]) for r in rows)
        return len(rows) <= self.config.max_batch and longest + max_new_tokens <= self.config.max_seq_len

    def generate(self, rows: list[dict[str, Any]], sampling: SamplingParams, max_new_tokens: int,
                 on_tokens: Callable[[list[int]], bool], seed: int | None = None) -> int:
        """Generate for up to ``max_batch`` prompts in lock step (benchmarks and warm-up; serving goes through
        :class:`glmv.engine.scheduler.Batcher`). ``on_tokens`` gets each step's new ids (one per row) and
        returns True when every row is finished. Returns the number of steps run."""
        from .scheduler import RowParams

        b = len(rows)
        if b > self.config.max_batch:
            raise ValueError(f"batch of {b} exceeds the engine's max_batch {self.config.max_batch}")
        if seed is not None:
            torch.manual_seed(seed)
        params = RowParams.from_sampling(sampling, max_new_tokens)
        self._reset_dummy(self._bucket(b))
        with torch.inference_mode():
            first, kv, pos = [], [], []
            for r, inputs in enumerate(rows):
                n = int(inputs["input_ids"].shape[1])
                if n + 1 > self.config.max_seq_len:
                    raise ValueError(f"prompt of {n} tokens exceeds the engine's {self.config.max_seq_len}-token cache")
                self.start_row(r, params, inputs["input_ids"][0])
                pos3, delta = self.prompt_positions(inputs)
                logits = self.prefill(r, inputs, 0, pos3)
                first.append(logits)
                kv.append(n)
                pos.append(n + delta)
            tok = self.sample_rows(torch.cat(first), list(range(b)))
            for r in range(b):
                self.set_row(r, tok[r], kv[r], pos[r])
            max_new = max(1, min(max_new_tokens, self.config.max_seq_len - max(kv)))
            steps = 1
            if on_tokens(tok) or max_new == 1:
                return steps
            while steps < max_new:
                ids = self.decode(list(range(b)), params.greedy)
                steps += 1
                if on_tokens(ids):
                    break
            return steps

    @torch.inference_mode()
    def prefill_whole(self, row: int, inputs: dict[str, Any]) -> torch.Tensor:
        """Run a whole prompt through the model's own forward (vision tower, multimodal rope, cuDNN attention
        and the fused norms) and copy its keys/values into cache row ``row``; returns the last position's
        logits [1, vocab]. The reference for checks: serving prefills through :meth:`prefill`, which measured
        faster on an H200 (77 vs 85 ms for the screenshot, 2026-11-29)."""
        model = self.model
        inputs = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in inputs.items()}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(self.dtype)
        n = int(inputs["input_ids"].shape[1])
        model.model.rope_deltas = None  # never reuse the previous prompt's multimodal rope offsets
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        for i, (k, v) in enumerate(_cache_layers(out.past_key_values)):
            self.k_cache[i, row, :, :n].copy_(k[0])
            self.v_cache[i, row, :, :n].copy_(v[0])
        return out.logits[:, -1].float()

    def prefill(self, row: int, inputs: dict[str, Any], start: int, pos3: torch.Tensor) -> torch.Tensor:
        """Prefill prompt tokens ``start:`` of one row in chunks; returns the last position's logits [1, vocab]."""
        from .scheduler import Segment

        emb = self.prompt_embeds(inputs, start)
        n = int(inputs["input_ids"].shape[1])
        chunk = self.config.prefill_chunk * ALONE_CHUNKS
        logits = None
        for s in range(start, n, chunk):
            e = min(n, s + chunk)
            seg = Segment(row, emb[s - start : e - start], pos3[:, s:e], s, "last" if e == n else None)
            logits = self.extend([seg])[0]
        assert logits is not None
        return logits


def _mark_seen(seen: torch.Tensor, tok: torch.Tensor, active: torch.Tensor) -> None:
    """Add each active row's new token to its repetition-penalty history (inactive rows unchanged)."""
    seen.scatter_(1, tok[:, None], seen.gather(1, tok[:, None]) | active)


def _cache_layers(cache: Any):
    """(keys, values) per layer from a transformers cache object, across versions."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            yield layer.keys, layer.values
        return
    if hasattr(cache, "key_cache"):
        yield from zip(cache.key_cache, cache.value_cache)
        return
    for k, v in cache:  # legacy tuples
        yield k, v

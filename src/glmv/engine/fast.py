"""The fast generation path: prefill through transformers, decode through our own step.

Prefill (vision tower, multimodal rope, the whole prompt) runs through the model's own forward, one
prompt at a time, and its keys/values are copied into a static KV cache that this engine owns. Each
decode step then runs the text decoder from the same weights with cuBLAS matrix products and the fused
Triton kernels of :mod:`glmv.engine.kernels`; sampling (repetition penalty, temperature, top-k, top-p)
happens inside the step, on the GPU. On CUDA the step is captured once per batch size as a CUDA graph,
so decoding a token is one graph replay and one 8-byte copy to the host.

Works for the dense GLM-4.6V-Flash text decoder (``glm4v``) on one GPU in bf16/fp16, or with its
linear layers in glmv's int4 format (:mod:`glmv.engine.w4`). Anything else (bitsandbytes weights, the MoE
model, several GPUs) uses transformers' ``generate``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .gemv import GemvTuner, tuner_cache_file
from .kernels import Kernels, install_fused_norms
from .w4 import W4Linear, w4_linear

TOPK_CAP = 256  # candidates kept for top-k/top-p sampling (top_k=0 means "all": approximated by these)


@dataclass
class EngineConfig:
    max_batch: int = 8
    max_seq_len: int = 16384
    use_graphs: bool = True
    use_triton: bool = True
    n_splits: int = 16
    # time cuBLAS against Triton GEMV per shape (cached on disk); GLMV_TUNE=0 turns it off
    tune: bool = field(default_factory=lambda: os.environ.get("GLMV_TUNE", "1") != "0")


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
        self.tuner = GemvTuner(tuner_cache_file(self.device)) if (self.kernels.use_triton and self.config.tune) else None
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
        self._out = torch.zeros(b, dtype=torch.long, device=self.device)
        self._host_out = torch.zeros(b, dtype=torch.long, pin_memory=self.is_cuda)
        self._graphs: dict[int, Any] = {}
        self._pool: Any = None

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
    def _step(self, b: int) -> torch.Tensor:
        K = self.kernels
        tokens, positions = self._tokens[:b], self._positions[:b]
        write_idx, seq_lens = self._write_idx[:b], self._seq_lens[:b]
        h = F.embedding(tokens, self.embed)
        y = K.rmsnorm(h, self.layers[0].in_norm, self.eps)
        n = len(self.layers)
        for i, lw in enumerate(self.layers):
            kc, vc = self.k_cache[i], self.v_cache[i]
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
        seen = self._seen[:b]
        logits = logits.float()
        rep = self._rep[:b, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        greedy_tok = logits.argmax(-1)
        if greedy_only:  # a separate graph for greedy requests skips the top-k machinery
            seen.scatter_(1, greedy_tok[:, None], True)
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
        seen.scatter_(1, tok[:, None], True)
        return tok

    def _advance(self, b: int, greedy: bool = False) -> None:
        out = self._sample(self._step(b), b, greedy)
        self._out[:b].copy_(out)
        self._tokens[:b].copy_(out)
        self._positions[:b] += 1
        self._write_idx[:b] += 1
        self._seq_lens[:b] += 1

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
        saved = [t.clone() for t in (self._positions, self._write_idx, self._seq_lens, self._tokens,
                                     self._seen, self._greedy)]
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
        for t, s in zip((self._positions, self._write_idx, self._seq_lens, self._tokens, self._seen, self._greedy), saved):
            t.copy_(s)
        torch.cuda.synchronize()

    def _reset_dummy(self, b: int) -> None:
        self._tokens[:b].zero_()
        self._positions[:b].zero_()
        self._write_idx[:b].zero_()
        self._seq_lens[:b].fill_(1)
        self._seen[:b].zero_()
        self._greedy[:b].fill_(True)

    # -- prefill -------------------------------------------------------------------------------
    def _prefill_row(self, row: int, inputs: dict[str, Any]) -> torch.Tensor:
        """Run one prompt through the model, store its KV in cache row ``row``; return the last logits."""
        model = self.model
        inputs = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in inputs.items()}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(self.dtype)
        n = int(inputs["input_ids"].shape[1])
        if n + 1 > self.config.max_seq_len:
            raise ValueError(f"prompt of {n} tokens exceeds the engine's {self.config.max_seq_len}-token cache")
        model.model.rope_deltas = None  # never reuse the previous prompt's multimodal rope offsets
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        for i, (k, v) in enumerate(_cache_layers(out.past_key_values)):
            self.k_cache[i, row, :, :n].copy_(k[0])
            self.v_cache[i, row, :, :n].copy_(v[0])
        delta = getattr(model.model, "rope_deltas", None)
        delta_v = int(delta.reshape(-1)[0]) if delta is not None else 0
        self._positions[row] = n + delta_v
        self._write_idx[row] = n
        self._seq_lens[row] = n + 1
        self._seen[row].zero_()
        self._seen[row, inputs["input_ids"][0]] = True
        return out.logits[:, -1]

    # -- generation ------------------------------------------------------------------------------
    def fits(self, rows: list[dict[str, Any]], max_new_tokens: int) -> bool:
        """Whether these prompts and answer length fit the engine's batch and cache sizes."""
        longest = max(int(r["input_ids"].shape[1]) for r in rows)
        return len(rows) <= self.config.max_batch and longest + max_new_tokens <= self.config.max_seq_len


    @torch.inference_mode()
    def generate(self, rows: list[dict[str, Any]], gen: dict[str, Any], on_tokens: Callable[[list[int]], bool],
                 seed: int | None = None) -> int:
        """Generate for up to ``max_batch`` prompts. ``on_tokens`` gets each step's new ids (one per row)
        and returns True when every row is finished. Returns the number of steps run."""
        b = len(rows)
        if b > self.config.max_batch:
            raise ValueError(f"batch of {b} exceeds the engine's max_batch {self.config.max_batch}")
        bucket = self._bucket(b)
        greedy = not gen.get("do_sample", False)
        if self.use_graphs:
            self._capture_now(bucket, greedy)  # first batch of this kind: captured once, before its prefill
        if seed is not None:
            torch.manual_seed(seed)
        self._reset_dummy(bucket)
        self._greedy[:bucket].fill_(greedy)
        self._temp[:bucket].fill_(float(gen.get("temperature") or 1.0))
        self._top_k[:bucket].fill_(int(gen.get("top_k") or 0))
        self._top_p[:bucket].fill_(float(gen.get("top_p") or 1.0))
        self._rep[:bucket].fill_(float(gen.get("repetition_penalty") or 1.0))
        first = []
        for r, inputs in enumerate(rows):
            logits = self._prefill_row(r, inputs)
            first.append(logits)
        tok = self._sample(torch.cat(first).float(), b)
        self._tokens[:b].copy_(tok)
        max_new = int(gen["max_new_tokens"])
        limit = self.config.max_seq_len - int(self._write_idx[:b].max()) - 1
        max_new = max(1, min(max_new, limit + 1))
        steps = 1
        if on_tokens(tok.tolist()) or max_new == 1:
            return steps
        graph = self._graphs.get((bucket, greedy))
        while steps < max_new:
            if graph is not None:
                graph.replay()
                torch.cuda.current_stream().synchronize()
                ids = self._host_out[:b].tolist()
            else:
                self._advance(bucket, greedy)
                ids = self._out[:b].tolist()
            steps += 1
            if on_tokens(ids):
                break
        return steps


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

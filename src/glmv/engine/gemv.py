"""Batch-1 matrix-vector products for bf16 weights, and a tuner that picks the fastest way per shape.

cuBLAS handles these shapes with split-K GEMM kernels plus a separate reduction kernel; a plain Triton
GEMV streams each weight row block once and can fold the MLP's SiLU-and-multiply into its input. Which
is faster depends on the card and the shape, so :class:`GemvTuner` times cuBLAS and a few Triton tile
sizes for every distinct shape once, on the GPU, and remembers the winner in a JSON file under the glmv
cache (keyed by GPU name and versions), so later starts skip the timing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .kernels import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(X, W, B_, Y, N, K, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            w = tl.load(W + offs_n[:, None] * K + offs_k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            if SILU:
                g = tl.load(X + offs_k, mask=kmask, other=0.0).to(tl.float32)
                u = tl.load(X + K + offs_k, mask=kmask, other=0.0).to(tl.float32)
                x = (u * (g / (1.0 + tl.exp(-g)))).to(X.dtype.element_ty).to(tl.float32)
            else:
                x = tl.load(X + offs_k, mask=kmask, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(B_ + offs_n, mask=nmask, other=0.0).to(tl.float32)
        tl.store(Y + offs_n, out.to(Y.dtype.element_ty), mask=nmask)


CONFIGS = [(8, 256, 4, 3), (16, 256, 4, 3), (16, 512, 8, 3), (32, 256, 8, 3), (8, 512, 4, 3), (4, 1024, 4, 3),
           (4, 512, 4, 4), (8, 1024, 8, 2)]


def triton_gemv(x, w, bias=None, silu=False, config=(16, 256, 4, 3)):
    """y[1, N] = x[1, K] @ w[N, K]^T (+ bias); with ``silu`` x is [1, 2K] = [gate | up]."""
    n, k = w.shape
    y = torch.empty(1, n, dtype=w.dtype, device=w.device)
    block_n, block_k, warps, stages = (tuple(config) + (3,))[:4]
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, bias if bias is not None else y, y, n, k,
                                            HAS_BIAS=bias is not None, SILU=silu, BLOCK_N=block_n,
                                            BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y


def _silu_mul(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    return u * F.silu(g)


class GemvTuner:
    """Chooses, per (N, K, silu) shape, between cuBLAS and Triton tile configurations by timing them."""

    def __init__(self, cache_file: Path | None) -> None:
        self.cache_file = cache_file
        self.choice: dict[str, Any] = {}
        if cache_file and cache_file.exists():
            try:
                self.choice = json.loads(cache_file.read_text())
            except ValueError:
                self.choice = {}
        self.tuned_now = 0
        self.timings: dict[str, dict[str, float]] = {}  # what tune() measured (ms), for reports

    @staticmethod
    def key(n: int, k: int, silu: bool, has_bias: bool) -> str:
        return f"{n}x{k}{'-silu' if silu else ''}{'-bias' if has_bias else ''}"

    def linear(self, x, w, bias=None, silu=False):
        if x.shape[0] != 1 or not HAVE_TRITON or not x.is_cuda:
            return F.linear(_silu_mul(x) if silu else x, w, bias)
        cfg = self.choice.get(self.key(w.shape[0], w.shape[1], silu, bias is not None), "cublas")
        if cfg == "cublas":
            return F.linear(_silu_mul(x) if silu else x, w, bias)
        return triton_gemv(x, w, bias, silu, tuple(cfg))

    def tune(self, w, bias=None, silu=False) -> None:
        """Time the candidates for this weight's shape (once; the result is saved)."""
        key = self.key(w.shape[0], w.shape[1], silu, bias is not None)
        if key in self.choice or not HAVE_TRITON or not w.is_cuda:
            return
        k = w.shape[1]
        x = torch.randn(1, 2 * k if silu else k, device=w.device, dtype=w.dtype)
        ref = F.linear(_silu_mul(x) if silu else x, w, bias)
        candidates: dict[str, Any] = {"cublas": lambda: F.linear(_silu_mul(x) if silu else x, w, bias)}
        for cfg in CONFIGS:
            try:
                out = triton_gemv(x, w, bias, silu, cfg)
            except Exception:  # a tile that does not compile here: skip it
                continue
            err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-6)).item()
            if err < 2e-2:
                candidates[json.dumps(list(cfg))] = (lambda c=cfg: triton_gemv(x, w, bias, silu, c))
        best, best_t = "cublas", float("inf")
        self.timings[key] = {}
        for name, fn in candidates.items():
            t = _time(fn)
            self.timings[key][name] = round(t, 4)
            if t < best_t:
                best, best_t = name, t
        self.choice[key] = "cublas" if best == "cublas" else json.loads(best)
        self.tuned_now += 1

    @staticmethod
    def w4_key(n: int, k: int, rows: int) -> str:
        return f"{n}x{k}-w4v2-r{rows}"

    def w4_linear(self, x, w, bias=None, silu=False):
        """int4 product with the block sizes tuned for this shape and batch size (untuned: defaults)."""
        from .w4 import w4_linear

        cfg = self.choice.get(self.w4_key(w.packed.shape[0], w.packed.shape[1] * 2, x.shape[0]))
        return w4_linear(x, w.packed, w.scale, w.mn, bias, silu=silu, config=tuple(cfg) if cfg else None)

    def tune_w4(self, w, bias=None, rows: int = 1) -> None:
        """Time the int4 kernel's block sizes for this shape at ``rows`` rows of input (once; saved)."""
        from .w4 import configs_for, dequantize_w4, w4_linear

        n, k = w.packed.shape[0], w.packed.shape[1] * 2
        key = self.w4_key(n, k, rows)
        if key in self.choice or not HAVE_TRITON or not w.packed.is_cuda:
            return
        x = torch.randn(rows, k, device=w.packed.device, dtype=torch.bfloat16)
        ref = F.linear(x, dequantize_w4(w.packed, w.scale, w.mn), bias)
        configs = configs_for(rows)
        best, best_t = None, float("inf")
        self.timings[key] = {}
        for cfg in configs:
            try:
                out = w4_linear(x, w.packed, w.scale, w.mn, bias, config=cfg)
            except Exception:  # a tile that does not compile here: skip it
                continue
            err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-6)).item()
            if err > 2e-2:
                continue
            t = _time(lambda c=cfg: w4_linear(x, w.packed, w.scale, w.mn, bias, config=c))
            self.timings[key][str(cfg)] = round(t, 4)
            if t < best_t:
                best, best_t = list(cfg), t
        if best is not None:
            self.choice[key] = best
            self.tuned_now += 1

    def save(self) -> None:
        release_flush()
        if not self.cache_file or not self.tuned_now:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.choice, indent=1, sort_keys=True))
        os.replace(tmp, self.cache_file)


_FLUSH: dict[Any, torch.Tensor] = {}


def release_flush() -> None:
    """Free the L2-flush buffer the timings use (256 MB: it matters on a 10 GB card)."""
    _FLUSH.clear()


def _time(fn, reps: int = 20) -> float:
    """Median time of ``fn`` with a cold L2 (a decode step reads each weight once, from HBM). All
    repetitions are queued before one synchronisation, so the GPU stays busy (clocks up, launches hidden)
    as in a graph-replayed step."""
    flush = _FLUSH.setdefault(torch.cuda.current_device(), torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda"))
    for _ in range(5):
        fn()
    events = []
    for _ in range(reps):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2]


def tuner_cache_file(device: torch.device, directory: Path) -> Path:
    """The tuned choices' file in ``directory`` for this GPU, torch and Triton."""
    name = torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")
    tri = getattr(__import__("triton"), "__version__", "none") if HAVE_TRITON else "none"
    return directory / f"gemv-{name}-torch{torch.__version__.split('+')[0]}-triton{tri}.json"

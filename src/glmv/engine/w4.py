"""glmv's fast 4-bit mode: int4 weights (groups of 128, scale and minimum per group) with Triton kernels.

Layout: each output row is stored as 32-bit words, 16 per group of 128 input columns. Nibble ``j`` (bits
4j..4j+3) of word ``t`` holds the 4-bit code of column ``16 * j + t``, so that for each nibble position a
kernel multiplies a contiguous run of 16 inputs; a row's words are contiguous, so a thread reads 16
bytes (32 weights) with one load. Dequantisation is ``w = q * scale + min`` (asymmetric round-to-nearest
from each group's range; fp16 scale and minimum). Decoding reads about 0.53 bytes per weight instead of 2.

The kernels never convert integers to floats (a quarter-rate instruction that bounded the first version):
a nibble moved into bits 19..22 of the float 1.0 is ``1 + q / 16``, so with ``T = sum((1 + q/16) * x)``
over a group, ``sum(w * x) = 16 * scale * T + (min - 16 * scale) * sum(x)``. Kernels:

- a GEMV for one row of input (batch-1 decode): per-thread 16-byte weight loads, one FMA per weight;
- a GEMM for 2..32 rows: tiles dequantised to bf16 in registers and multiplied on the tensor cores,
  optionally split over K (float32 atomics) for the shapes with few output blocks;
- a dequantisation kernel for long inputs (prefill), which then use cuBLAS.

Block sizes are chosen per shape and batch size by :class:`glmv.engine.gemv.GemvTuner`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import HAVE_TRITON

GROUP = 128

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _nibble(p, J: tl.constexpr):
        """Nibble J of each int32 word as the float 1 + q / 16 (bit operations only)."""
        if 19 - 4 * J >= 0:
            v = p << (19 - 4 * J)
        else:
            v = p >> (4 * J - 19)
        return ((v & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _group_dots(p, X, gi, gmask, BLOCK_N: tl.constexpr, NG: tl.constexpr, WIDE: tl.constexpr):
        """For a [BLOCK_N, NG, 16] tile of words: (T, xs) with T[n, g] = sum((1 + q/16) * x) over each
        group and xs[g] = sum(x). WIDE decodes all 8 nibbles as one [.., 8, 16] tensor, else one by one."""
        offs_t = tl.arange(0, 16)
        if WIDE:
            offs_j = tl.arange(0, 8)
            x3 = tl.load(X + gi[:, None, None] * 128 + offs_j[None, :, None] * 16 + offs_t[None, None, :],
                         mask=gmask[:, None, None], other=0.0).to(tl.float32)
            q = (p[:, :, None, :] >> (4 * offs_j)[None, None, :, None]) & 15
            f = ((q << 19) | 0x3F800000).to(tl.float32, bitcast=True)
            t = tl.sum(tl.sum(f * x3[None, :, :, :], axis=3), axis=2)
            xs = tl.sum(tl.sum(x3, axis=2), axis=1)
        else:
            t3 = tl.zeros([BLOCK_N, NG, 16], tl.float32)
            x2 = tl.zeros([NG, 16], tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(X + gi[:, None] * 128 + j * 16 + offs_t[None, :], mask=gmask[:, None], other=0.0)
                xj = xj.to(tl.float32)
                t3 += _nibble(p, j) * xj[None, :, :]
                x2 += xj
            t = tl.sum(t3, axis=2)
            xs = tl.sum(x2, axis=1)
        return t, xs

    @triton.jit
    def _w4_gemv_kernel(X, P, S, M, B_, Y, N, KW, n_groups,
                        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr, WIDE: tl.constexpr,
                        PREFETCH: tl.constexpr):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        offs_g = tl.arange(0, NG)
        offs_t = tl.arange(0, 16)
        prow = P + offs_n[:, None, None] * KW + offs_t[None, None, :]
        acc = tl.zeros([BLOCK_N, NG], tl.float32)
        if PREFETCH:  # the next tile's load is in flight while this one is multiplied
            p = tl.load(prow + offs_g[None, :, None] * 16,
                        mask=nmask[:, None, None] & (offs_g < n_groups)[None, :, None], other=0)
        for g0 in range(0, n_groups, NG):
            gi = g0 + offs_g
            gmask = gi < n_groups
            if PREFETCH:
                gn = gi + NG
                p_next = tl.load(prow + gn[None, :, None] * 16,
                                 mask=nmask[:, None, None] & (gn < n_groups)[None, :, None], other=0)
            else:
                p = tl.load(prow + gi[None, :, None] * 16, mask=nmask[:, None, None] & gmask[None, :, None], other=0)
            sm = nmask[:, None] & gmask[None, :]
            s = tl.load(S + offs_n[:, None] * n_groups + gi[None, :], mask=sm, other=0.0).to(tl.float32)
            m = tl.load(M + offs_n[:, None] * n_groups + gi[None, :], mask=sm, other=0.0).to(tl.float32)
            t, xs = _group_dots(p, X, gi, gmask, BLOCK_N, NG, WIDE)
            a = 16.0 * s
            acc += a * t + (m - a) * xs[None, :]
            if PREFETCH:
                p = p_next
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(B_ + offs_n, mask=nmask, other=0.0).to(tl.float32)
        tl.store(Y + offs_n, out.to(Y.dtype.element_ty), mask=nmask)

    @triton.jit
    def _w4_gemm_kernel(X, P, S, M, B_, Y, R, N, KW, n_groups, x_stride, groups_per_split,
                        HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr,
                        SPLIT: tl.constexpr):
        """Rows 2..32: for each nibble position j the [BLOCK_N, NG * 16] weight slice (columns
        128 g + 16 j + t) is dequantised to bf16 in registers and multiplied on the tensor cores with the
        matching input columns. With SPLIT > 1 the groups are shared out over SPLIT programs, which add
        their float32 partial sums into Y (zeroed by the caller)."""
        pid_n = tl.program_id(0)
        pid_b = tl.program_id(1)
        sp = tl.program_id(2)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        bmask = offs_b < R
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        offs_g = tl.arange(0, NG)
        offs_t = tl.arange(0, 16)
        offs_c = tl.arange(0, NG * 16)  # (group, t) flattened, matching the reshaped weight tile
        g_start = sp * groups_per_split
        g_end = tl.minimum(g_start + groups_per_split, n_groups)
        acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        for g0 in range(g_start, g_end, NG):
            gi = g0 + offs_g
            gmask = gi < g_end
            p = tl.load(P + offs_n[:, None, None] * KW + gi[None, :, None] * 16 + offs_t[None, None, :],
                        mask=nmask[:, None, None] & gmask[None, :, None], other=0)
            sm = nmask[:, None] & gmask[None, :]
            s = tl.load(S + offs_n[:, None] * n_groups + gi[None, :], mask=sm, other=0.0).to(tl.float32)
            m = tl.load(M + offs_n[:, None] * n_groups + gi[None, :], mask=sm, other=0.0).to(tl.float32)
            a = (16.0 * s)[:, :, None]
            c = (m[:, :, None] - a)
            col = (g0 + offs_c // 16) * 128 + offs_c % 16
            cmask = bmask[:, None] & ((g0 + offs_c // 16) < g_end)[None, :]
            for j in tl.static_range(8):
                # bf16 operands on the tensor cores (fp32 inputs, as in the CPU interpreter's tests, stay fp32)
                w = (_nibble(p, j) * a + c).to(X.dtype.element_ty)
                w = tl.reshape(w, (BLOCK_N, NG * 16))
                xj = tl.load(X + offs_b[:, None] * x_stride + col[None, :] + j * 16, mask=cmask, other=0.0)
                acc += tl.dot(xj, tl.trans(w))
        if HAS_BIAS:
            if sp == 0:
                acc += tl.load(B_ + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        out = Y + offs_b[:, None] * N + offs_n[None, :]
        omask = bmask[:, None] & nmask[None, :]
        if SPLIT > 1:
            tl.atomic_add(out, acc, mask=omask)
        else:
            tl.store(out, acc.to(Y.dtype.element_ty), mask=omask)

    @triton.jit
    def _w4_dequant_kernel(P, S, M, W, K, n_groups, OUT_ROWS: tl.constexpr):
        row0 = tl.program_id(0) * OUT_ROWS
        g = tl.program_id(1)
        offs_r = row0 + tl.arange(0, OUT_ROWS)
        offs_t = tl.arange(0, 16)
        p = tl.load(P + offs_r[:, None] * (K // 8) + g * 16 + offs_t[None, :])
        s = tl.load(S + offs_r * n_groups + g).to(tl.float32)[:, None]
        m = tl.load(M + offs_r * n_groups + g).to(tl.float32)[:, None]
        base = W + offs_r[:, None] * K + g * 128 + offs_t[None, :]
        for j in tl.static_range(8):
            tl.store(base + j * 16, (_nibble(p, j) * (16.0 * s) + (m - 16.0 * s)).to(W.dtype.element_ty))


def quantize_w4(w: torch.Tensor, rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float weight -> (packed uint8 [N, K/2], scale fp16 [N, K/128], min fp16 [N, K/128]).
    Large weights are done in chunks of rows, so the float32 temporaries stay small."""
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"in_features {k} is not a multiple of {GROUP}")
    if n > rows_per_chunk:
        parts = [quantize_w4(w[i : i + rows_per_chunk]) for i in range(0, n, rows_per_chunk)]
        return tuple(torch.cat([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]
    g = w.float().view(n, k // GROUP, GROUP)
    lo = g.amin(-1)
    hi = g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    scale16 = scale.half()
    lo16 = lo.half()
    q = torch.round((g - lo16.float()[..., None]) / scale16.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_codes(q.view(n, k)), scale16.contiguous(), lo16.contiguous()


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] (uint8, 0..15) -> the packed layout [N, K/2] uint8 (see the module docstring).
    Byte ``b`` of word ``t`` (little-endian) holds nibbles ``2b`` (low) and ``2b + 1`` (high)."""
    n, k = q.shape
    q4 = q.view(n, k // GROUP, 8, 16)  # [row, group, nibble j, word t]
    byte = q4[:, :, 0::2] | (q4[:, :, 1::2] << 4)  # [row, group, byte b, word t]
    return byte.transpose(2, 3).reshape(n, k // 2).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: [N, K/2] uint8 -> codes [N, K] uint8."""
    n, half = packed.shape
    k = half * 2
    byte = packed.view(n, k // GROUP, 16, 4).transpose(2, 3)  # [row, group, byte b, word t]
    q4 = torch.stack([byte & 15, byte >> 4], dim=3)  # [row, group, b, low/high, t]
    return q4.reshape(n, k)


def dequantize_w4(packed: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    n, half = packed.shape
    k = half * 2
    if HAVE_TRITON and packed.is_cuda:
        w = torch.empty(n, k, dtype=dtype, device=packed.device)
        rows = 4 if n % 4 == 0 else 1
        _w4_dequant_kernel[(n // rows, k // GROUP)](packed.view(torch.int32), scale, mn, w, k, k // GROUP, OUT_ROWS=rows)
        return w
    q = unpack_codes(packed).float().view(n, k // GROUP, GROUP)
    w = q * scale.float()[..., None] + mn.float()[..., None]
    return w.view(n, k).to(dtype)


class W4Linear(torch.nn.Module):
    """A Linear layer holding int4 weights. Small inputs use the Triton kernels; large ones cuBLAS."""

    def __init__(self, packed, scale, mn, bias, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("mn", mn)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, device: torch.device | str) -> "W4Linear":
        w = linear.weight.detach().to(device)
        packed, scale, mn = quantize_w4(w)
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        return cls(packed, scale, mn, bias, linear.in_features, linear.out_features)

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects .weight (dtype, device)
        return self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] <= 32 and x.is_cuda and HAVE_TRITON:
            y = w4_linear(x2, self.packed, self.scale, self.mn, self.bias)
        else:
            y = F.linear(x2, dequantize_w4(self.packed, self.scale, self.mn, x.dtype), self.bias)
        return y.view(*shape[:-1], self.out_features)


# Batch 1: (BLOCK_N, groups per step, warps, stages, wide decode, prefetch); 2..32 rows: (BLOCK_B, BLOCK_N,
# groups per step, warps, stages, split-K). The tuner times them per shape and batch size (measured on an H200: the
# best of the first build's set was (8, 8, 4, 2) / (8, 16, 8, 2) / (4, 16, 4, 2)); the first is the default.
GEMV_CONFIGS = [(8, 8, 4, 2, 0, 0), (4, 16, 4, 2, 0, 0), (8, 16, 8, 2, 0, 0), (8, 8, 4, 1, 0, 1),
                (4, 16, 4, 1, 0, 1), (8, 16, 8, 1, 0, 1), (16, 8, 8, 1, 0, 1), (8, 8, 4, 2, 1, 0),
                (4, 16, 4, 2, 1, 0), (8, 8, 4, 1, 1, 1), (16, 8, 8, 1, 1, 1), (4, 8, 2, 1, 0, 1),
                (16, 4, 2, 1, 0, 1), (32, 4, 4, 1, 0, 1), (16, 8, 4, 1, 0, 1)]
GEMM_CONFIGS = [(16, 32, 2, 4, 3, 1), (16, 64, 4, 4, 2, 1), (16, 32, 8, 4, 2, 1), (16, 32, 2, 4, 3, 4),
                (16, 32, 8, 4, 2, 4), (16, 64, 4, 4, 2, 2), (16, 16, 4, 4, 3, 4), (32, 64, 4, 8, 2, 1),
                (32, 32, 2, 4, 3, 1), (32, 32, 4, 4, 2, 4), (32, 64, 4, 8, 2, 2), (32, 64, 8, 8, 2, 1),
                (32, 128, 4, 8, 2, 1), (32, 32, 8, 4, 2, 1), (32, 64, 2, 4, 3, 1),
                # wide tiles split over K: the 4096-wide outputs get enough programs (an H200 has 132 SMs) while
                # each program still amortises its input tile over 128-256 outputs
                (32, 128, 4, 8, 2, 2), (32, 128, 4, 8, 2, 4), (32, 256, 4, 8, 2, 1), (32, 256, 4, 8, 2, 4),
                (16, 128, 4, 8, 2, 1), (16, 128, 4, 8, 2, 2), (16, 128, 4, 8, 2, 4), (16, 256, 4, 8, 2, 2)]


def configs_for(rows: int) -> list[tuple]:
    """The block-size configurations the tuner tries for ``rows`` rows of input."""
    if rows == 1:
        return GEMV_CONFIGS
    return [c for c in GEMM_CONFIGS if c[0] <= max(16, rows)]


def w4_linear(x, packed, scale, mn, bias=None, silu: bool = False, config: tuple | None = None):
    """y = x @ W^T (+ bias). With ``silu`` the input is [R, 2K] = [gate | up] and silu(gate) * up is used."""
    if silu:
        x = silu_mul(x)
    r = x.shape[0]
    n = packed.shape[0]
    k = packed.shape[1] * 2
    n_groups = k // GROUP
    if not HAVE_TRITON or not x.is_cuda and not _interpreting():
        return F.linear(x, dequantize_w4(packed, scale, mn, x.dtype), bias)
    out_dtype = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
    y = torch.empty(r, n, dtype=out_dtype, device=x.device)
    b = bias if bias is not None else y
    p32 = packed.view(torch.int32)
    if r == 1:
        block_n, ng, warps, stages, wide, prefetch = (tuple(config or GEMV_CONFIGS[0]) + (0, 0))[:6]
        _w4_gemv_kernel[(triton.cdiv(n, block_n),)](x, p32, scale, mn, b, y, n, k // 8, n_groups,
                                                    HAS_BIAS=bias is not None, BLOCK_N=block_n, NG=ng,
                                                    WIDE=bool(wide), PREFETCH=bool(prefetch),
                                                    num_warps=warps, num_stages=stages)
    else:
        block_b, block_n, ng, warps, stages, split = (tuple(config or GEMM_CONFIGS[0]) + (1,))[:6]
        if r > block_b and block_b < 32 and config is None:
            block_b = 32
        per = triton.cdiv(triton.cdiv(n_groups, split), ng) * ng
        split = triton.cdiv(n_groups, per)
        out = y if split == 1 else torch.zeros(r, n, dtype=torch.float32, device=x.device)
        _w4_gemm_kernel[(triton.cdiv(n, block_n), triton.cdiv(r, block_b), split)](
            x, p32, scale, mn, b, out, r, n, k // 8, n_groups, x.stride(0), per,
            HAS_BIAS=bias is not None, BLOCK_B=block_b, BLOCK_N=block_n, NG=ng, SPLIT=split,
            num_warps=warps, num_stages=stages)
        if split > 1:
            y.copy_(out)
    return y


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for [R, 2K] = [gate | up] (the fused Triton kernel on CUDA)."""
    if HAVE_TRITON and gu.is_cuda:
        from .kernels import Kernels

        return Kernels(use_triton=True).silu_mul(gu.contiguous())
    g, u = gu.chunk(2, dim=-1)
    return u * F.silu(g)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


TEXT_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_up_proj", "mlp.down_proj")


@torch.no_grad()
def quantize_text_decoder(model, device) -> int:
    """Replace the text decoder's Linear layers by W4Linear on ``device`` (one at a time, freeing each
    bf16 weight as it goes). Returns the number of layers converted. The vision tower, embeddings and
    lm_head stay in bf16."""
    count = 0
    for layer in model.model.language_model.layers:
        for name in TEXT_LINEARS:
            parent_name, attr = name.split(".")
            parent = getattr(layer, parent_name)
            lin = getattr(parent, attr)
            if isinstance(lin, W4Linear):
                continue
            setattr(parent, attr, W4Linear.from_linear(lin, device))
            del lin
            count += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the quantization temporaries back
    return count

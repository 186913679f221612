"""glmv's fast 4-bit mode: int4 weights (groups of 128, scale and minimum per group) with Triton kernels.

Layout: for each output row and each group of 128 input columns, byte ``j`` (0..63) holds the 4-bit
codes of columns ``j`` (low nibble) and ``j + 64`` (high nibble), so a kernel reads one contiguous
64-byte run per group and multiplies the low and high halves with two contiguous slices of the input.
Dequantisation is ``w = q * scale + min`` (asymmetric round-to-nearest, computed from each group's
range). Decoding reads about 0.53 bytes per weight instead of 2.

Kernels: a GEMV for one row of input (batch-1 decode; the sum is rearranged to
``scale * sum(q * x) + min * sum(x)``, so there is no per-weight dequantisation), optionally applying
SiLU-and-multiply to its input on the fly (the MLP's down projection); and a small-batch GEMM that
dequantises tiles into bf16 for the tensor cores. Larger inputs (prefill) dequantise the whole weight
and use cuBLAS.
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
    def _w4_gemv_kernel(X, P, S, M, B_, Y, N, K, n_groups,
                        HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        offs_g = tl.arange(0, NG)
        offs_h = tl.arange(0, 64)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for g0 in range(0, n_groups, NG):
            gi = g0 + offs_g
            gmask = gi < n_groups
            pmask = nmask[:, None, None] & gmask[None, :, None]
            p = tl.load(P + offs_n[:, None, None] * (K // 2) + gi[None, :, None] * 64 + offs_h[None, None, :],
                        mask=pmask, other=0)
            s = tl.load(S + offs_n[:, None] * n_groups + gi[None, :], mask=nmask[:, None] & gmask[None, :], other=0.0)
            m = tl.load(M + offs_n[:, None] * n_groups + gi[None, :], mask=nmask[:, None] & gmask[None, :], other=0.0)
            xo = gi[:, None] * 128 + offs_h[None, :]
            if SILU:
                gl = tl.load(X + xo, mask=gmask[:, None], other=0.0).to(tl.float32)
                ul = tl.load(X + K + xo, mask=gmask[:, None], other=0.0).to(tl.float32)
                gh = tl.load(X + xo + 64, mask=gmask[:, None], other=0.0).to(tl.float32)
                uh = tl.load(X + K + xo + 64, mask=gmask[:, None], other=0.0).to(tl.float32)
                xl = ul * (gl / (1.0 + tl.exp(-gl)))
                xh = uh * (gh / (1.0 + tl.exp(-gh)))
                xl = xl.to(X.dtype.element_ty).to(tl.float32)  # the reference rounds the activation too
                xh = xh.to(X.dtype.element_ty).to(tl.float32)
            else:
                xl = tl.load(X + xo, mask=gmask[:, None], other=0.0).to(tl.float32)
                xh = tl.load(X + xo + 64, mask=gmask[:, None], other=0.0).to(tl.float32)
            lo = (p & 15).to(tl.float32)
            hi = (p >> 4).to(tl.float32)
            t = tl.sum(lo * xl[None, :, :] + hi * xh[None, :, :], axis=2)  # [BLOCK_N, NG]
            xs = tl.sum(xl + xh, axis=1)  # [NG]
            acc += tl.sum(s.to(tl.float32) * t + m.to(tl.float32) * xs[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(B_ + offs_n, mask=nmask, other=0.0).to(tl.float32)
        tl.store(Y + offs_n, acc.to(Y.dtype.element_ty), mask=nmask)

    @triton.jit
    def _w4_gemm_kernel(X, P, S, M, B_, Y, R, N, K, n_groups, x_stride,
                        HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_b = tl.program_id(1)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        bmask = offs_b < R
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        offs_h = tl.arange(0, 64)
        acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        for g in range(0, n_groups):
            p = tl.load(P + offs_n[:, None] * (K // 2) + g * 64 + offs_h[None, :], mask=nmask[:, None], other=0)
            s = tl.load(S + offs_n * n_groups + g, mask=nmask, other=0.0).to(tl.float32)
            m = tl.load(M + offs_n * n_groups + g, mask=nmask, other=0.0).to(tl.float32)
            wl = ((p & 15).to(tl.float32) * s[:, None] + m[:, None]).to(tl.bfloat16)
            wh = ((p >> 4).to(tl.float32) * s[:, None] + m[:, None]).to(tl.bfloat16)
            xo = offs_b[:, None] * x_stride + g * 128 + offs_h[None, :]
            if SILU:
                gl = tl.load(X + xo, mask=bmask[:, None], other=0.0).to(tl.float32)
                ul = tl.load(X + K + xo, mask=bmask[:, None], other=0.0).to(tl.float32)
                gh = tl.load(X + xo + 64, mask=bmask[:, None], other=0.0).to(tl.float32)
                uh = tl.load(X + K + xo + 64, mask=bmask[:, None], other=0.0).to(tl.float32)
                xl = (ul * (gl / (1.0 + tl.exp(-gl)))).to(tl.bfloat16)
                xh = (uh * (gh / (1.0 + tl.exp(-gh)))).to(tl.bfloat16)
            else:
                xl = tl.load(X + xo, mask=bmask[:, None], other=0.0).to(tl.bfloat16)
                xh = tl.load(X + xo + 64, mask=bmask[:, None], other=0.0).to(tl.bfloat16)
            acc += tl.dot(xl, tl.trans(wl)) + tl.dot(xh, tl.trans(wh))
        if HAS_BIAS:
            acc += tl.load(B_ + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_b[:, None] * N + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=bmask[:, None] & nmask[None, :])


if HAVE_TRITON:

    @triton.jit
    def _w4_dequant_kernel(P, S, M, W, K, n_groups):
        row = tl.program_id(0)
        g = tl.program_id(1)
        offs = tl.arange(0, 64)
        p = tl.load(P + row * (K // 2) + g * 64 + offs)
        s = tl.load(S + row * n_groups + g).to(tl.float32)
        m = tl.load(M + row * n_groups + g).to(tl.float32)
        base = W + row * K + g * 128
        tl.store(base + offs, ((p & 15).to(tl.float32) * s + m).to(W.dtype.element_ty))
        tl.store(base + 64 + offs, ((p >> 4).to(tl.float32) * s + m).to(W.dtype.element_ty))


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
    packed = (q[..., :64] | (q[..., 64:] << 4)).reshape(n, k // 2).contiguous()
    return packed, scale16.contiguous(), lo16.contiguous()


def dequantize_w4(packed: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    n, half = packed.shape
    k = half * 2
    if HAVE_TRITON and packed.is_cuda:
        w = torch.empty(n, k, dtype=dtype, device=packed.device)
        _w4_dequant_kernel[(n, k // GROUP)](packed, scale, mn, w, k, k // GROUP)
        return w
    p = packed.view(n, k // GROUP, 64)
    q = torch.cat([p & 15, p >> 4], dim=-1).float()  # [N, G, 128]
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


# (BLOCK_N, groups per step, warps, stages), timed per shape by the tuner.
GEMV_CONFIGS = [(16, 4, 4, 2), (4, 8, 4, 3), (8, 8, 4, 3), (8, 16, 4, 3), (16, 8, 4, 3), (32, 4, 8, 3),
                (4, 16, 4, 3), (8, 4, 2, 4), (2, 16, 2, 3)]


def w4_linear(x, packed, scale, mn, bias=None, silu: bool = False, config: tuple | None = None):
    """y = x @ W^T (+ bias). With ``silu`` the input is [R, 2K] = [gate | up] and silu(gate) * up is used."""
    r = x.shape[0]
    n = packed.shape[0]
    k = packed.shape[1] * 2
    n_groups = k // GROUP
    y = torch.empty(r, n, dtype=torch.bfloat16 if x.dtype == torch.float32 else x.dtype, device=x.device)
    if not HAVE_TRITON or not x.is_cuda and not _interpreting():
        xin = silu_mul(x) if silu else x
        return F.linear(xin, dequantize_w4(packed, scale, mn, x.dtype), bias)
    b = bias if bias is not None else y
    if r == 1:
        block_n, ng, warps, stages = tuple(config or GEMV_CONFIGS[0])[:4]
        _w4_gemv_kernel[(triton.cdiv(n, block_n),)](x, packed, scale, mn, b, y, n, k, n_groups,
                                                    HAS_BIAS=bias is not None, SILU=silu, BLOCK_N=block_n, NG=ng,
                                                    num_warps=warps, num_stages=stages)
    else:
        block_b = 16 if r <= 16 else 32
        block_n = 64
        _w4_gemm_kernel[(triton.cdiv(n, block_n), triton.cdiv(r, block_b))](
            x, packed, scale, mn, b, y, r, n, k, n_groups, x.stride(0),
            HAS_BIAS=bias is not None, SILU=silu, BLOCK_B=block_b, BLOCK_N=block_n)
    return y


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
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

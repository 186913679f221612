"""The decode step's small kernels, in Triton, each with a plain-PyTorch reference.

At batch 1, decoding is bound by reading the weights once per token; everything that is not a matrix
product must cost as little as possible. These kernels fuse what PyTorch would run as many small
launches: RMSNorm with the residual add and the next norm, rotary embedding with the KV-cache write,
SiLU-and-multiply, and GQA decode attention that reads only the filled part of the cache without
expanding the key/value heads (split over the sequence, then reduced).

The ``*_ref`` functions compute the same thing with PyTorch ops; the engine uses them on the CPU, and
the tests check each kernel against them (on the CPU through Triton's interpreter).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - the CPU path needs no Triton
    HAVE_TRITON = False


# -- references (PyTorch) ------------------------------------------------------------------------
def rmsnorm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def add_rmsnorm2_ref(res, a, w1, w2, eps):
    """h = res + norm(a) * w1; y = norm(h) * w2. Returns (h, y)."""
    h = res + rmsnorm_ref(a, w1, eps)
    return h, rmsnorm_ref(h, w2, eps)


def rotate_pairs(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs: x [T, heads, D] rotated over its first 2*freqs.shape[-1] dims by the
    angles freqs [T, rot/2] (the layout the decode kernel uses); the rest of each head passes through."""
    return rotate_pairs_cs(x, freqs.cos()[:, None, :], freqs.sin()[:, None, :])


def rotate_pairs_cs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`rotate_pairs` with the angles' cosines and sines given ([T, 1, rot/2]; computed once for all layers)."""
    rot = 2 * cos.shape[-1]
    xf = x.float()
    e, o = xf[..., 0:rot:2], xf[..., 1:rot:2]
    out = xf.clone()
    out[..., 0:rot:2] = e * cos - o * sin
    out[..., 1:rot:2] = o * cos + e * sin
    return out.to(x.dtype)


def rope_cache_ref(qkv, k_cache, v_cache, positions, write_idx, inv_freq, n_heads, n_kv, head_dim):
    """Rotate q and k (interleaved pairs over the first 2*len(inv_freq) dims), write k and v to the cache.

    qkv: [B, (H + 2*KV) * D]; caches: [Bmax, KV, S, D]; positions, write_idx: [B]. Returns q: [B, H, D].
    """
    b = qkv.shape[0]
    x = qkv.view(b, n_heads + 2 * n_kv, head_dim)
    q, k, v = x[:, :n_heads], x[:, n_heads : n_heads + n_kv], x[:, n_heads + n_kv :]
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # [B, rot/2]
    q = rotate_pairs(q, freqs)
    k = rotate_pairs(k, freqs)
    rows = torch.arange(b, device=qkv.device)
    k_cache[rows, :, write_idx.long()] = k
    v_cache[rows, :, write_idx.long()] = v
    return q


def silu_mul_ref(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    return u * torch.nn.functional.silu(g)


def decode_attention_ref(q, k_cache, v_cache, seq_lens, scale):
    """q: [B, H, D]; caches [Bmax, KV, S, D]; attends to positions < seq_lens[b]. Returns [B, H, D]."""
    b, h, d = q.shape
    kv = k_cache.shape[1]
    out = torch.empty_like(q)
    for i in range(b):
        n = int(seq_lens[i])
        k = k_cache[i, :, :n].float().repeat_interleave(h // kv, dim=0)  # [H, n, D]
        v = v_cache[i, :, :n].float().repeat_interleave(h // kv, dim=0)
        s = torch.einsum("hd,hnd->hn", q[i].float(), k) * scale
        out[i] = torch.einsum("hn,hnd->hd", s.softmax(-1), v).to(q.dtype)
    return out


# -- Triton kernels ---------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _normed(x, W, OUT, offs, mask, N, eps):
        """A float32 row RMS-normalised, cast to OUT's dtype, times the weights (the model's RMSNorm order)."""
        r = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(W + offs, mask=mask, other=0.0)
        return (x * r).to(OUT.dtype.element_ty) * w

    @triton.jit
    def _rmsnorm_kernel(X, W, Y, stride, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(X + row * stride + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride + offs, _normed(x, W, Y, offs, mask, N, eps), mask=mask)

    @triton.jit
    def _add_rmsnorm2_kernel(R, A, W1, W2, H, Y, stride, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        a = tl.load(A + row * stride + offs, mask=mask, other=0.0).to(tl.float32)
        res = tl.load(R + row * stride + offs, mask=mask, other=0.0)
        h = res + _normed(a, W1, H, offs, mask, N, eps)
        tl.store(H + row * stride + offs, h, mask=mask)
        tl.store(Y + row * stride + offs, _normed(h.to(tl.float32), W2, Y, offs, mask, N, eps), mask=mask)

    @triton.jit
    def _rope_cache_kernel(QKV, QOUT, KC, VC, POS, WIDX, INVF, qkv_stride,
                           kc_b, kc_h, kc_s, n_heads, n_kv,
                           D: tl.constexpr, HALF: tl.constexpr):
        b = tl.program_id(0)
        head = tl.program_id(1)  # 0..H-1: q heads, then KV k heads, then KV v heads
        base = QKV + b * qkv_stride + head * D
        offs_d = tl.arange(0, D)
        if head < n_heads + n_kv:
            pos = tl.load(POS + b).to(tl.float32)
            i = tl.arange(0, HALF)
            f = pos * tl.load(INVF + i)
            c = tl.cos(f)
            s = tl.sin(f)
            e = tl.load(base + 2 * i).to(tl.float32)
            o = tl.load(base + 2 * i + 1).to(tl.float32)
            re = e * c - o * s
            ro = o * c + e * s
            x = tl.load(base + offs_d)
            if head < n_heads:
                dst = QOUT + (b * n_heads + head) * D
            else:
                widx = tl.load(WIDX + b)
                dst = KC + b * kc_b + (head - n_heads) * kc_h + widx * kc_s
            tl.store(dst + offs_d, x, mask=offs_d >= 2 * HALF)
            tl.store(dst + 2 * i, re.to(x.dtype))
            tl.store(dst + 2 * i + 1, ro.to(x.dtype))
        else:
            widx = tl.load(WIDX + b)
            x = tl.load(base + offs_d)
            tl.store(VC + b * kc_b + (head - n_heads - n_kv) * kc_h + widx * kc_s + offs_d, x)

    @triton.jit
    def _silu_mul_kernel(GU, OUT, I, gu_stride, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < I
        g = tl.load(GU + b * gu_stride + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + b * gu_stride + I + offs, mask=mask, other=0.0).to(tl.float32)
        y = u * (g / (1.0 + tl.exp(-g)))
        tl.store(OUT + b * I + offs, y.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _attn_split_kernel(Q, KC, VC, LENS, PO, PL, scale,
                           kc_b, kc_h, kc_s, n_heads, n_kv, n_splits,
                           G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
        """One (row, kv head, split): the G query heads sharing this kv head, over one slice of the cache."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        n = tl.load(LENS + b)
        per = tl.cdiv(tl.cdiv(n, n_splits), BLOCK_N) * BLOCK_N
        start = sp * per
        end = tl.minimum(start + per, n)
        offs_g = tl.arange(0, GP)
        gmask = offs_g < G
        offs_d = tl.arange(0, D)
        q = tl.load(Q + (b * n_heads + kvh * G + offs_g)[:, None] * D + offs_d[None, :], mask=gmask[:, None], other=0.0)
        m = tl.full([GP], float("-inf"), tl.float32)
        l = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        kbase = KC + b * kc_b + kvh * kc_h
        vbase = VC + b * kc_b + kvh * kc_h
        for s0 in range(start, end, BLOCK_N):
            offs_n = s0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            k = tl.load(kbase + offs_n[:, None] * kc_s + offs_d[None, :], mask=nmask[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale  # [GP, BLOCK_N]
            scores = tl.where(nmask[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            v = tl.load(vbase + offs_n[:, None] * kc_s + offs_d[None, :], mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        row = (b * n_kv + kvh) * n_splits + sp
        safe_l = tl.where(l > 0, l, 1.0)
        tl.store(PO + (row * G + offs_g)[:, None] * D + offs_d[None, :], acc / safe_l[:, None], mask=gmask[:, None])
        lse = tl.where(l > 0, m + tl.log(safe_l), float("-inf"))
        tl.store(PL + row * G + offs_g, lse, mask=gmask)

    @triton.jit
    def _attn_reduce_kernel(PO, PL, OUT, n_kv, n_splits, G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr):
        """Combine the splits' normalised partial outputs, weighted by exp(lse - max lse)."""
        b = tl.program_id(0)
        head = tl.program_id(1)
        kvh = head // G
        g = head % G
        offs_s = tl.arange(0, SPLITS)
        smask = offs_s < n_splits
        rows = (b * n_kv + kvh) * n_splits + offs_s
        lse = tl.load(PL + rows * G + g, mask=smask, other=float("-inf"))
        mx = tl.max(lse, axis=0)
        w = tl.where(lse > float("-inf"), tl.exp(lse - mx), 0.0)
        offs_d = tl.arange(0, D)
        parts = tl.load(PO + (rows * G + g)[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
        out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
        tl.store(OUT + (b * (n_kv * G) + head) * D + offs_d, out.to(OUT.dtype.element_ty))


def _block(n: int) -> int:
    return 1 << (n - 1).bit_length()


class Kernels:
    """Dispatch: Triton on CUDA tensors (or anywhere with ``interpret``), references otherwise."""

    def __init__(self, use_triton: bool) -> None:
        self.use_triton = use_triton and HAVE_TRITON

    def rmsnorm(self, x, w, eps):
        if not self.use_triton:
            return rmsnorm_ref(x, w, eps)
        y = torch.empty_like(x)
        _rmsnorm_kernel[(x.shape[0],)](x, w, y, x.stride(0), x.shape[1], eps, BLOCK=_block(x.shape[1]))
        return y

    def add_rmsnorm2(self, res, a, w1, w2, eps):
        if not self.use_triton:
            return add_rmsnorm2_ref(res, a, w1, w2, eps)
        h = torch.empty_like(res)
        y = torch.empty_like(res)
        _add_rmsnorm2_kernel[(res.shape[0],)](res, a, w1, w2, h, y, res.stride(0), res.shape[1], eps,
                                               BLOCK=_block(res.shape[1]))
        return h, y

    def rope_cache(self, qkv, k_cache, v_cache, positions, write_idx, inv_freq, n_heads, n_kv, head_dim):
        if not self.use_triton:
            return rope_cache_ref(qkv, k_cache, v_cache, positions, write_idx, inv_freq, n_heads, n_kv, head_dim)
        b = qkv.shape[0]
        q = torch.empty(b, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
        _rope_cache_kernel[(b, n_heads + 2 * n_kv)](
            qkv, q, k_cache, v_cache, positions, write_idx, inv_freq, qkv.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), n_heads, n_kv,
            D=head_dim, HALF=inv_freq.shape[0])
        return q

    def silu_mul(self, gu):
        if not self.use_triton:
            return silu_mul_ref(gu)
        b, two_i = gu.shape
        inter = two_i // 2
        out = torch.empty(b, inter, dtype=gu.dtype, device=gu.device)
        block = 1024
        _silu_mul_kernel[(b, triton.cdiv(inter, block))](gu, out, inter, gu.stride(0), BLOCK=block)
        return out

    def decode_attention(self, q, k_cache, v_cache, seq_lens, scale, n_splits: int = 16):
        if not self.use_triton:
            return decode_attention_ref(q, k_cache, v_cache, seq_lens, scale)
        b, h, d = q.shape
        kv = k_cache.shape[1]
        g = h // kv
        po = torch.empty(b * kv * n_splits * g, d, dtype=torch.float32, device=q.device)
        pl = torch.empty(b * kv * n_splits * g, dtype=torch.float32, device=q.device)
        _attn_split_kernel[(b, kv, n_splits)](q, k_cache, v_cache, seq_lens, po, pl, scale,
                                               k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), h, kv, n_splits,
                                               G=g, GP=max(16, _block(g)), D=d, BLOCK_N=32)
        out = torch.empty_like(q)
        _attn_reduce_kernel[(b, h)](po, pl, out, kv, n_splits, G=g, D=d, SPLITS=_block(n_splits))
        return out


def install_fused_norms(model: torch.nn.Module) -> int:
    """Route the model's own RMSNorm modules (vision tower and text decoder) through the fused Triton
    kernel for bf16/fp16 CUDA inputs: one launch instead of the ~7 that transformers' float32 version
    runs, about 200 times per prefill. Other inputs keep the original code. Returns the modules changed."""
    if not HAVE_TRITON:
        return 0
    kernels = Kernels(use_triton=True)
    count = 0
    for mod in model.modules():
        if not type(mod).__name__.endswith("RMSNorm") or getattr(mod, "_glmv_fused", False):
            continue
        eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
        weight = getattr(mod, "weight", None)
        if eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            continue
        original = mod.forward

        def forward(hidden_states, _mod=mod, _orig=original, _eps=float(eps)):
            w = _mod.weight
            if (hidden_states.is_cuda and hidden_states.dtype in (torch.bfloat16, torch.float16)
                    and w.dtype == hidden_states.dtype and hidden_states.shape[-1] == w.shape[0]):
                shape = hidden_states.shape
                return kernels.rmsnorm(hidden_states.reshape(-1, shape[-1]).contiguous(), w, _eps).view(shape)
            return _orig(hidden_states)

        mod.forward = forward
        mod._glmv_fused = True
        count += 1
    return count


__all__ = ["Kernels", "HAVE_TRITON", "install_fused_norms"]

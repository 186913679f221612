"""Correctness checks for the fast engine on a CUDA GPU (run before timing it).

    PYTHONPATH=src python scripts/gpu_check.py

1. each Triton kernel against its PyTorch reference, in bf16, on random inputs (relative error);
2. the engine against transformers' generate on the tiny checkpoint: identical greedy tokens in fp32,
   with images, text-only and batched;
3. the full-size random GLM-4.6V-Flash: the engine's first decode-step logits against the model's own
   forward (relative error), since greedy tokens of random weights are too flat to compare.
"""

from __future__ import annotations

import sys
import time

import torch


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def kernels() -> bool:
    from glmv.engine.kernels import (Kernels, add_rmsnorm2_ref, decode_attention_ref, rmsnorm_ref, rope_cache_ref,
                                     silu_mul_ref)

    K = Kernels(use_triton=True)
    ok = True
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(1)
    x = torch.randn(8, 4096, device=dev, dtype=dt)
    a = torch.randn_like(x)
    w1, w2 = torch.randn(4096, device=dev, dtype=dt), torch.randn(4096, device=dev, dtype=dt)
    checks = {"rmsnorm": rel(K.rmsnorm(x, w1, 1e-5), rmsnorm_ref(x, w1, 1e-5))}
    h1, y1 = K.add_rmsnorm2(x, a, w1, w2, 1e-5)
    h2, y2 = add_rmsnorm2_ref(x, a, w1, w2, 1e-5)
    checks["add_rmsnorm2"] = max(rel(h1, h2), rel(y1, y2))
    H, KV, D, S, B = 32, 2, 128, 2048, 8
    qkv = torch.randn(B, (H + 2 * KV) * D, device=dev, dtype=dt)
    kc1 = torch.randn(B, KV, S, D, device=dev, dtype=dt)
    vc1 = torch.randn_like(kc1)
    kc2, vc2 = kc1.clone(), vc1.clone()
    pos = torch.randint(0, 5000, (B,), device=dev)
    widx = torch.randint(0, S, (B,), device=dev, dtype=torch.int32)
    invf = 1.0 / (500000 ** (torch.arange(0, 64, 2, device=dev).float() / 64))
    q1 = K.rope_cache(qkv, kc1, vc1, pos, widx, invf, H, KV, D)
    q2 = rope_cache_ref(qkv, kc2, vc2, pos, widx, invf, H, KV, D)
    checks["rope_cache"] = max(rel(q1, q2), rel(kc1, kc2), rel(vc1, vc2))
    gu = torch.randn(B, 2 * 13696, device=dev, dtype=dt)
    checks["silu_mul"] = rel(K.silu_mul(gu), silu_mul_ref(gu))
    q = torch.randn(B, H, D, device=dev, dtype=dt)
    lens = torch.tensor([1, 17, 100, 1206, 2048, 33, 512, 1999], device=dev, dtype=torch.int32)
    checks["decode_attention"] = rel(K.decode_attention(q, kc1, vc1, lens, D ** -0.5), decode_attention_ref(q, kc1, vc1, lens, D ** -0.5))
    for name, err in checks.items():
        good = err < 2e-2
        ok &= good
        print(f"kernel {name:18s} rel.err {err:.2e} {'ok' if good else 'FAIL'}")
    return ok


def w4_kernels() -> bool:
    from glmv.engine.w4 import dequantize_w4, quantize_w4, w4_linear

    ok = True
    torch.manual_seed(2)
    for (n, k) in ((4608, 4096), (4096, 13696), (27392, 4096)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        p, s, m = quantize_w4(w)
        wd = dequantize_w4(p, s, m)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
        for r in (1, 3, 8, 32):
            x = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)
            err = rel(w4_linear(x, p, s, m, bias), torch.nn.functional.linear(x, wd, bias))
            gu = torch.randn(r, 2 * k, device="cuda", dtype=torch.bfloat16)
            g, u = gu.chunk(2, -1)
            err2 = rel(w4_linear(gu, p, s, m, silu=True), torch.nn.functional.linear(u * torch.nn.functional.silu(g), wd))
            good = err < 1e-2 and err2 < 1e-2
            ok &= good
            print(f"w4 {n}x{k} rows {r:2d}: rel.err {err:.1e} / silu {err2:.1e} {'ok' if good else 'FAIL'}")
        print(f"w4 {n}x{k}: quantization rel.err {rel(wd, w):.3f}")
    return ok


def tiny_parity() -> bool:
    from PIL import Image

    from glmv.backends.base import GenerationRequest, collect
    from glmv.backends.local import LocalBackend
    from glmv.media import load_image
    from glmv.prompts import user_message
    from glmv.settings import Settings

    import os

    os.environ["GLMV_TUNE"] = "0"  # this checks the engine's logic: same products as generate, exact tokens
    ok = True
    for dtype in ("float32",):
        hf = LocalBackend(Settings(model="tiny", engine="hf", device="cuda", dtype=dtype), log=lambda m: None).load()
        fast = LocalBackend(Settings(model="tiny", engine="fast", device="cuda", dtype=dtype), log=print).load()

        def req(b, i):
            img = [load_image(Image.new("RGB", (280 + 56 * i, 196), (i * 40, 100, 200)))] if i != 2 else []
            return GenerationRequest([user_message("describe this image" + " please" * i, img)],
                                     sampling=b.default_sampling.merged(max_new_tokens=40, temperature=0))

        for i in range(4):
            a = collect(hf.generate(req(hf, i))).raw_text
            b = collect(fast.generate(req(fast, i))).raw_text
            same = a == b
            ok &= same
            print(f"tiny {dtype} prompt {i}: engine == generate: {same}")
        hf.close()
        fast.close()
    return ok


def full_logits() -> bool:
    from transformers import AutoProcessor

    from glmv.bench import build_model, make_inputs
    from glmv.engine.fast import EngineConfig, FastEngine
    from glmv.testing.tiny import ensure_tiny_checkpoint

    processor = AutoProcessor.from_pretrained(ensure_tiny_checkpoint())
    model = build_model("full-random", "cuda", torch.bfloat16, processor)
    inputs, _ = make_inputs(processor, __import__("pathlib").Path("input/image_3.png"), 1)
    dev = {k: v.to("cuda") for k, v in inputs.items()}
    dev["pixel_values"] = dev["pixel_values"].to(torch.bfloat16)
    with torch.inference_mode():
        model.model.rope_deltas = None
        out = model(**dev, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
        # reference: the model's own forward for the next token, continuing its cache
        n = dev["input_ids"].shape[1]
        delta = model.model.rope_deltas
        pos = (torch.tensor([[n]], device="cuda") + delta).view(1, 1, 1).expand(3, 1, 1)
        ref = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, position_ids=pos,
                    attention_mask=torch.ones(1, n + 1, device="cuda", dtype=torch.long), use_cache=True).logits[:, -1]
    engine = FastEngine(model, EngineConfig(max_batch=1, max_seq_len=2048, use_graphs=False))
    with torch.inference_mode():
        engine._reset_dummy(1)
        engine._prefill_row(0, inputs)
        engine._tokens[:1].copy_(nxt)
        mine = engine._step(1)
    err = rel(mine, ref)
    print(f"full-size step-1 logits rel.err {err:.2e} {'ok' if err < 3e-2 else 'FAIL'}")
    del engine, model
    torch.cuda.empty_cache()
    return err < 3e-2


if __name__ == "__main__":
    t0 = time.time()
    results = {}
    for name, fn in (("kernels", kernels), ("w4_kernels", w4_kernels), ("tiny_parity", tiny_parity),
                     ("full_logits", full_logits)):
        try:
            results[name] = fn()
        except Exception as exc:
            import traceback

            traceback.print_exc()
            results[name] = False
    print("CHECKS", results, f"{time.time() - t0:.0f}s")
    sys.exit(0 if all(results.values()) else 1)

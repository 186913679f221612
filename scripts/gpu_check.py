"""Correctness checks for the fast engine on a CUDA GPU (run before timing it).

    PYTHONPATH=src python scripts/gpu_check.py

1. each Triton kernel against its PyTorch reference, in bf16, on random inputs (relative error);
2. the engine against transformers' generate on the tiny checkpoint: identical greedy tokens in fp32,
   with images, text-only and batched;
3. the full-size random GLM-4.6V-Flash: the engine's first decode-step logits against the model's own
   forward (relative error), since greedy tokens of random weights are too flat to compare;
4. the same model's engine tokens (bf16 and int4, batch 1 and 4) teacher-forced through the model's own
   forward: each in its top 5 and within bf16 rounding of its best logit.
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
    from glmv.engine.w4 import configs_for, dequantize_w4, quantize_w4, unpack_codes, w4_linear

    ok = True
    torch.manual_seed(2)
    for (n, k) in ((4608, 4096), (4096, 13696), (27392, 4096)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        p, s, m = quantize_w4(w)
        wd = dequantize_w4(p, s, m)
        # the GPU dequantisation kernel against the layout's definition, on the CPU
        ref_w = (unpack_codes(p.cpu()).float().view(n, k // 128, 128) * s.cpu().float()[..., None]
                 + m.cpu().float()[..., None]).view(n, k)
        derr = rel(wd.cpu(), ref_w)
        ok &= derr < 1e-2
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
        for r in (1, 2, 3, 8, 17, 32):
            configs = [None] + configs_for(r) if n == 4608 else [None]
            worst = 0.0
            for cfg in configs:
                x = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)
                y = w4_linear(x, p, s, m, bias, config=cfg)
                worst = max(worst, rel(y, torch.nn.functional.linear(x, wd, bias)))
            gu = torch.randn(r, 2 * k, device="cuda", dtype=torch.bfloat16)
            g, u = gu.chunk(2, -1)
            err2 = rel(w4_linear(gu, p, s, m, silu=True), torch.nn.functional.linear(u * torch.nn.functional.silu(g), wd))
            good = worst < 1e-2 and err2 < 1e-2
            ok &= good
            print(f"w4 {n}x{k} rows {r:2d} ({len(configs)} configs): rel.err {worst:.1e} / silu {err2:.1e} "
                  f"{'ok' if good else 'FAIL'}")
        print(f"w4 {n}x{k}: dequant kernel rel.err {derr:.1e}; quantization rel.err {rel(wd, w):.3f}")
    return ok


def tiny_parity() -> bool:
    from PIL import Image

    from glmv.backends.base import GenerationRequest, collect
    from glmv.backends.local import LocalBackend
    from glmv.media import load_image
    from glmv.prompts import user_message
    from glmv.settings import Settings

    # tune=False: this checks the engine's logic (same products as generate, exact tokens), as do the checks after it
    ok = True
    for dtype in ("float32",):
        hf = LocalBackend(Settings(model="tiny", engine="hf", device="cuda", dtype=dtype), log=lambda m: None).load()
        fast = LocalBackend(Settings(model="tiny", engine="fast", device="cuda", dtype=dtype, tune=False), log=print).load()

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
    from glmv.tiny import ensure_tiny_checkpoint

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
    engine = FastEngine(model, EngineConfig(max_batch=1, max_seq_len=2048, use_graphs=False, tune=False))
    with torch.inference_mode():
        engine._reset_dummy(1)
        engine.prefill_whole(0, inputs)
        _, delta = engine.prompt_positions(inputs)
        engine.set_row(0, int(nxt), n, n + delta)
        mine = engine._step(1)
    err = rel(mine, ref)
    print(f"full-size step-1 logits rel.err {err:.2e} {'ok' if err < 3e-2 else 'FAIL'}")
    del engine, model
    torch.cuda.empty_cache()
    return err < 3e-2


def vision_graph() -> bool:
    """The vision tower with its blocks replayed as a CUDA graph (the engine's path) against transformers'
    eager forward: same features (relative error), and both timed."""
    from transformers import AutoProcessor

    from glmv.bench import build_model, make_inputs
    from glmv.engine.fast import EngineConfig, FastEngine
    from glmv.tiny import ensure_tiny_checkpoint

    processor = AutoProcessor.from_pretrained(ensure_tiny_checkpoint())
    model = build_model("full-random", "cuda", torch.bfloat16, processor)
    inputs, _ = make_inputs(processor, __import__("pathlib").Path("input/image_3.png"), 1, "cuda")
    pv, grid = inputs["pixel_values"].to("cuda", torch.bfloat16), inputs["image_grid_thw"].to("cuda")
    engine = FastEngine(model, EngineConfig(max_batch=1, max_seq_len=2048, tune=False))
    if engine.vision is None:
        print("vision graph: not used (unsupported tower or no graphs)")
        return False
    times = {}
    with torch.inference_mode():
        ref = torch.cat(list(model.model.get_image_features(pv, grid).pooler_output))
        got = engine._media_features("image", pv, grid, None)
        for name, fn in (("eager", lambda: model.model.get_image_features(pv, grid)),
                         ("graphed", lambda: engine._media_features("image", pv, grid, None))):
            ts = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            times[name] = sorted(ts)[2] * 1e3
    err = rel(got, ref)
    good = err < 1e-2 and not engine.vision.failed
    print(f"vision graph: rel.err {err:.1e} vs eager; eager {times['eager']:.1f} ms, graphed {times['graphed']:.1f} ms "
          f"{'ok' if good else 'FAIL'}")
    # a short segment after cached tokens (a follow-up's tail) through the decode kernel, against sdpa with a mask
    import glmv.engine.fast as fast_mod
    from glmv.engine.scheduler import Segment

    with torch.inference_mode():
        pos3, delta = engine.prompt_positions(inputs)
        engine.prefill(0, inputs, 0, pos3)
        n = int(inputs["input_ids"].shape[1])
        toks = torch.randint(0, 150000, (40,), device="cuda")
        tail = Segment(0, torch.nn.functional.embedding(toks, engine.embed),
                       (torch.arange(40, device="cuda") + n + delta).expand(3, -1), n, "all")
        short = engine.extend([tail])[0]
        saved, fast_mod.SHORT_SEGMENT = fast_mod.SHORT_SEGMENT, 0
        try:
            masked = engine.extend([tail])[0]
        finally:
            fast_mod.SHORT_SEGMENT = saved
    terr = rel(short, masked)
    good &= terr < 3e-2  # the bound of the step-1 check: two bf16 attention kernels, 40 random layers (2.2e-2 seen)
    print(f"short tail through the decode kernel vs sdpa with a mask: logits rel.err {terr:.1e} "
          f"{'ok' if terr < 3e-2 else 'FAIL'}")
    del engine, model
    torch.cuda.empty_cache()
    return good


def _row_inputs(processor, image, text):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    inputs = dict(processor(text=[prompt], images=[image], return_tensors="pt", device="cuda"))
    inputs.pop("token_type_ids", None)
    return inputs


def teacher_forced() -> bool:
    """Engine tokens (bf16 batch 1 and 4, then int4 batch 1 and 4; 24 greedy tokens each) fed back through
    the model's own forward: each must be in its top 5 and within bf16 rounding of its best logit."""
    from PIL import Image
    from transformers import AutoProcessor

    from glmv.bench import build_model
    from glmv.engine.fast import GREEDY, EngineConfig, FastEngine
    from glmv.engine.w4 import quantize_text_decoder
    from glmv.tiny import ensure_tiny_checkpoint

    processor = AutoProcessor.from_pretrained(ensure_tiny_checkpoint())
    model = build_model("full-random", "cuda", torch.bfloat16, processor)
    image = Image.open("input/image_3.png").convert("RGB")
    texts = ["describe this image", "what is on this page?", "list the buttons", "write the HTML"]
    rows = [_row_inputs(processor, image, t) for t in texts]
    n_new = 24
    ok = True
    for mode in ("bf16", "w4"):
        if mode == "w4":
            quantize_text_decoder(model, "cuda")
            torch.cuda.empty_cache()
        engine = FastEngine(model, EngineConfig(max_batch=4, max_seq_len=2048, tune=False))
        engine.capture([1, 4])
        for batch in (1, 4):
            got = [[] for _ in range(batch)]

            def on_tokens(ids, got=got):
                for i, t in enumerate(ids):
                    got[i].append(t)
                return False

            engine.generate(rows[:batch], GREEDY, n_new, on_tokens)
            worst_rank, worst_gap = 0, 0.0
            for r in range(batch):
                inp = {k: v.to("cuda") for k, v in rows[r].items()}
                toks = torch.tensor(got[r][:n_new], device="cuda")
                ext = torch.cat([inp["input_ids"][0], toks[:-1]])[None]
                extra = {"mm_token_type_ids": torch.cat([inp["mm_token_type_ids"][0], torch.zeros_like(toks[:-1])])[None]} \
                    if "mm_token_type_ids" in inp else {}
                with torch.inference_mode():
                    model.model.rope_deltas = None
                    logits = model(input_ids=ext, attention_mask=torch.ones_like(ext), pixel_values=inp["pixel_values"].to(torch.bfloat16),
                                   image_grid_thw=inp["image_grid_thw"], logits_to_keep=len(toks), **extra).logits[0].float()
                picked = logits.gather(1, toks[:, None])[:, 0]
                rank = (logits > picked[:, None]).sum(-1)
                gap = (logits.max(-1).values - picked) / logits.abs().max(-1).values.clamp_min(1e-3)
                worst_rank = max(worst_rank, int(rank.max()))
                worst_gap = max(worst_gap, float(gap.max()))
            good = worst_rank < 5 and worst_gap < 2 ** -5  # a few bf16 ulps of the largest logit
            ok &= good
            print(f"teacher-forced {mode} batch {batch}: {batch * n_new} tokens, worst rank {worst_rank}, "
                  f"worst gap {worst_gap:.1e} of the top logit {'ok' if good else 'FAIL'}")
        del engine
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return ok


if __name__ == "__main__":
    t0 = time.time()
    results = {}
    for name, fn in (("kernels", kernels), ("w4_kernels", w4_kernels), ("tiny_parity", tiny_parity),
                     ("full_logits", full_logits), ("vision_graph", vision_graph), ("teacher_forced", teacher_forced)):
        try:
            results[name] = fn()
        except Exception as exc:
            import traceback

            traceback.print_exc()
            results[name] = False
    print("CHECKS", results, f"{time.time() - t0:.0f}s")
    sys.exit(0 if all(results.values()) else 1)

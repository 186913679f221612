"""Where the first token's time goes for the 1288x728 screenshot (run on a CUDA GPU).

    PYTHONPATH=src python scripts/ttft_probe.py

Processor on the CPU vs on the GPU; the vision tower alone vs the whole prefill; sdpa's backends on the
vision tower's and the prompt's attention shapes; and a profile of one prefill (top kernels, GPU-busy
time vs wall time).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoProcessor

from glmv.bench import build_model, make_inputs
from glmv.tiny import ensure_tiny_checkpoint


def med(fn, n=5):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    from PIL import Image

    proc = AutoProcessor.from_pretrained(ensure_tiny_checkpoint())
    print("image processor:", type(proc.image_processor).__name__)
    image = Image.open("input/image_3.png").convert("RGB")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe this image"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    cpu = proc(text=[text], images=[image], return_tensors="pt")
    for dev in ("cpu", "cuda"):
        kw = {} if dev == "cpu" else {"device": "cuda"}
        try:
            out = proc(text=[text], images=[image], return_tensors="pt", **kw)
            t = med(lambda: proc(text=[text], images=[image], return_tensors="pt", **kw), 7)
            err = ((out["pixel_values"].float().cpu() - cpu["pixel_values"].float()).norm() / cpu["pixel_values"].float().norm()).item()
            print(f"processor {dev}: {t*1e3:.1f} ms, pixel_values on {out['pixel_values'].device}, rel.diff vs cpu {err:.1e}, "
                  f"ids equal {torch.equal(out['input_ids'].cpu(), cpu['input_ids'])}")
        except Exception as exc:
            print(f"processor {dev}: failed {type(exc).__name__}: {exc}"[:300])
    # the image part alone and the text part alone
    try:
        t = med(lambda: proc.image_processor(images=[image], return_tensors="pt", device="cuda"), 7)
        print(f"image processor alone on cuda: {t*1e3:.1f} ms")
        t = med(lambda: proc.image_processor(images=[image], return_tensors="pt"), 7)
        print(f"image processor alone on cpu: {t*1e3:.1f} ms")
        t = med(lambda: proc.tokenizer([text]), 7)
        print(f"tokenizer alone (no image expansion): {t*1e3:.1f} ms")
    except Exception as exc:
        print("split failed", exc)

    model = build_model("full-random", "cuda", torch.bfloat16, proc)
    inputs, _ = make_inputs(proc, Path("input/image_3.png"), 1)
    dev = {k: v.to("cuda") for k, v in inputs.items()}
    dev["pixel_values"] = dev["pixel_values"].to(torch.bfloat16)
    with torch.inference_mode():
        def full():
            model.model.rope_deltas = None
            return model(**dev, use_cache=True, logits_to_keep=1)

        def vision():
            return model.model.get_image_features(dev["pixel_values"], dev["image_grid_thw"])

        for _ in range(3):
            full()
        print(f"prefill (full forward, logits_to_keep=1): {med(full)*1e3:.1f} ms")
        print(f"vision tower alone: {med(vision)*1e3:.1f} ms")
        # the engine's own multi-token forward (fused qkv, fused norms, sdpa with GQA) for the same prompt
        from glmv.engine.fast import EngineConfig, FastEngine

        eng = FastEngine(model, EngineConfig(max_batch=1, max_seq_len=2048, tune=False))  # graphs: the vision blocks
        pos3, _ = eng.prompt_positions(dev)
        emb = eng.prompt_embeds(dev)
        from glmv.engine.scheduler import Segment

        def extend_only():
            return eng.extend([Segment(0, emb, pos3, 0, "last")])

        def engine_prefill():
            return eng.prefill(0, dev, 0, pos3)

        for _ in range(2):
            engine_prefill()
        print(f"engine.prefill (vision + extend): {med(engine_prefill)*1e3:.1f} ms; extend alone (prompt only): "
              f"{med(extend_only)*1e3:.1f} ms; prefill_whole: {med(lambda: eng.prefill_whole(0, dev))*1e3:.1f} ms; "
              f"prompt_positions: {med(lambda: eng.prompt_positions(dev))*1e3:.1f} ms")
        del eng
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            full()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=60))
    # sdpa backends per shape
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shapes = {"vision 12x4784 non-causal": ((1, 12, 4784, 128), (1, 12, 4784, 128), False, False),
              "prompt 32x1206 causal, 2 kv heads": ((1, 32, 1206, 128), (1, 2, 1206, 128), True, True)}
    for name, (qs, ks, causal, gqa) in shapes.items():
        q = torch.randn(qs, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(ks, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(ks, device="cuda", dtype=torch.bfloat16)
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            for expand in ((False, True) if gqa else (False,)):
                kk, vv = (k.repeat_interleave(16, 1), v.repeat_interleave(16, 1)) if expand else (k, v)
                try:
                    with sdpa_kernel([be]):
                        fn = lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=gqa and not expand)
                        fn()
                        t = med(fn, 10)
                    print(f"sdpa {name} {be.name}{' (kv expanded)' if expand else ''}: {t*1e3:.2f} ms")
                except Exception as exc:
                    print(f"sdpa {name} {be.name}{' (kv expanded)' if expand else ''}: unavailable ({str(exc)[:80]})")


if __name__ == "__main__":
    main()

"""Where a decode step's time goes: kernel times by kind for one step of the fast engine (full-size
random GLM-4.6V-Flash, batch 1), against the graph-replayed step time.

    PYTHONPATH=src python scripts/profile_decode.py [--w4]
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from glmv.bench import build_model, make_inputs, time_engine
from glmv.engine.fast import EngineConfig, FastEngine
from glmv.settings import tune_from_env, tuning_dir
from glmv.tiny import ensure_tiny_checkpoint
from transformers import AutoProcessor

w4 = "--w4" in sys.argv
processor = AutoProcessor.from_pretrained(ensure_tiny_checkpoint())
model = build_model("full-random", "cuda", torch.bfloat16, processor)
if w4:
    from glmv.engine.w4 import quantize_text_decoder

    quantize_text_decoder(model, "cuda")
    torch.cuda.empty_cache()
engine = FastEngine(model, EngineConfig(max_batch=1, max_seq_len=4096, tune=tune_from_env(), tuning_dir=tuning_dir()))
engine.capture()
if engine.tuner is not None:
    for key, times in engine.tuner.timings.items():
        print("tune", key, json.dumps(times))
inputs, _ = make_inputs(processor, Path("input/image_3.png"), 1)
time_engine(engine, inputs, 8, "cuda")
graph = engine._graphs[(1, True)]
for _ in range(10):
    graph.replay()
torch.cuda.synchronize()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(50):
    graph.replay()
e.record()
e.synchronize()
step_ms = s.elapsed_time(e) / 50
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        with torch.inference_mode():
            engine._advance(1, True)
    torch.cuda.synchronize()
by = collections.Counter()
count = collections.Counter()
for ev in prof.events():
    if ev.device_type == torch.autograd.DeviceType.CUDA:
        name = ev.name
        key = ("gemm" if any(t in name.lower() for t in ("gemm", "gemv", "nvjet", "cutlass", "sm90", "w4_gemv", "w4_gemm"))
               else name[:60])
        by[key] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        count[key] += 1
total = sum(by.values()) / 5 / 1e3
print(f"{'w4' if w4 else 'bf16'}: graph step {step_ms:.3f} ms ({1000 / step_ms:.1f} tok/s); kernel time per eager step {total:.3f} ms")
for k, v in by.most_common(25):
    print(f"  {v / 5 / 1e3:8.3f} ms  {count[k] // 5:5d} launches  {k}")

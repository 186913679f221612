"""Serving checks and micro-timings on a CUDA GPU (the load itself is `glmv bench --serve`).

    PYTHONPATH=src python scripts/serving_check.py [--model full-random|tiny] [--device cuda|cpu]

Through `LocalBackend` with the fast engine (the server's path, without HTTP):
1. greedy outputs: each request alone, then the same requests arriving while others decode (continuous
   batching), then with prompt-lookup speculation: identical or not (fp32 tiny: must be; bf16: the batch
   shape may flip a near-tie, so the share of identical tokens is reported too);
2. TTFT: a screenshot question on an empty prefix cache, then a follow-up on the same screenshot (cache hit);
3. cost of verifying 8 drafted tokens against one decode step at batch 1 (the bar: <= 1.25x).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from glmv.backends.base import GenerationRequest, collect  # noqa: E402
from glmv.backends.local import LocalBackend  # noqa: E402
from glmv.bench import build_model  # noqa: E402
from glmv.media import load_image  # noqa: E402
from glmv.prompts import Message, user_message  # noqa: E402
from glmv.settings import Settings  # noqa: E402
from glmv.tiny import ensure_tiny_checkpoint  # noqa: E402


def same_prefix(a: list[int], b: list[int]) -> float:
    """Share of the longer sequence that both start with."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(1, max(len(a), len(b)))


def follow_up_phases(backend, first, req, gpu: bool) -> dict[str, float]:
    """Where a follow-up's time to first token goes: each step of the path timed (synchronised) once."""
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    eng, batcher = backend.engine, backend.batcher
    phases: dict[str, float] = {}
    patched = []

    def wrap(obj, name: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **kw):
            sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync()
                phases[name] = phases.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

        setattr(obj, name, timed)
        patched.append((obj, name))

    batcher.cache.clear()
    r1 = collect(backend.generate(first))
    follow = req("what is the title?", history=[*first.messages, Message("assistant", [r1.output.answer or "ok"])])
    for obj, name in ((backend, "prepare"), (eng, "prompt_positions"), (batcher, "_reuse_prefix"),
                      (eng, "prompt_embeds"), (eng, "_media_features"), (eng, "extend"), (eng, "sample_rows")):
        wrap(obj, name)
    try:
        r2 = collect(backend.generate(follow))
    finally:
        for obj, name in patched:
            delattr(obj, name)  # the instance attribute goes; the class's method shows through again
    phases = {k: round(v, 2) for k, v in phases.items()}
    phases["ttft"] = round(r2.timings.ttft_s * 1e3, 2)
    return phases


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="full-random")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    from transformers import AutoProcessor

    gpu = args.device.startswith("cuda")
    processor = AutoProcessor.from_pretrained(ensure_tiny_checkpoint())
    model = build_model(args.model, args.device, torch.bfloat16 if gpu else torch.float32, processor)
    backend = LocalBackend.from_model(model, processor, Settings(model=args.model, engine="fast", max_seq_len=4096),
                                      log=lambda m: None)
    root = Path(__file__).resolve().parents[1]
    shot = load_image(str(root / "input" / "image_3.png"))
    page = "<html><body><h1>Orders</h1><table>" + "".join(
        f"<tr><td>{i}</td><td>Customer {i}</td><td>{i * 37 % 500}.00</td></tr>" for i in range(40)) + "</table></body></html>"

    def req(text, images=(), history=(), speculate=False, n=args.tokens):
        sampling = backend.default_sampling.merged(max_new_tokens=n, temperature=0, repetition_penalty=1.0)
        return GenerationRequest([*history, user_message(text, list(images))], sampling=sampling, speculate=speculate)

    out: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "model": args.model}
    cache = backend.batcher.cache
    # compare token ids, not text: a random model's tokens mostly decode to nothing with the tiny tokenizer
    emitted: dict[tuple, list[int]] = {}
    order: list[tuple] = []
    add = backend.batcher.add

    def recording_add(seq) -> None:
        key = tuple(seq.inputs["input_ids"][0].tolist())
        log: list[int] = []
        emitted[key] = log
        order.append(key)
        emit = seq.emit
        seq.emit = lambda ids: (log.extend(ids), emit(ids))[1]
        add(seq)

    backend.batcher.add = recording_add
    reqs = [req("describe this image", [shot]), req("what is the title?", [shot]), req("Change the title to Sales.\n" + page),
            req("list the links", [load_image(str(root / "input" / "image_1.png"))])]
    collect(backend.generate(req("warm up", n=4)))
    alone, keys = [], []
    for r in reqs:
        cache.clear()
        collect(backend.generate(r))
        keys.append(order[-1])
        alone.append(list(emitted[order[-1]]))
    cache.clear()

    def run(i: int) -> None:
        collect(backend.generate(reqs[i]))

    threads = []
    for i in range(len(reqs)):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    results = [list(emitted[k]) for k in keys]
    out["tokens_per_request"] = [len(a) for a in alone]
    out["batched_identical"] = [a == b for a, b in zip(alone, results)]
    out["batched_same_prefix"] = [round(same_prefix(a, b), 3) for a, b in zip(alone, results)]
    spec = []
    for r, a, k in zip(reqs, alone, keys):
        r.speculate = True
        cache.clear()
        res = collect(backend.generate(r))
        ids = list(emitted[k])
        spec.append({"identical": ids == a, "same_prefix": round(same_prefix(ids, a), 3),
                     "verify_steps": res.usage.speculative_steps, "accepted": res.usage.accepted_prediction_tokens})
    out["speculation"] = spec

    first = req("describe this image", [shot])
    ttft_cold, ttft_follow, cached = [], [], []
    for _ in range(5):
        cache.clear()
        r1 = collect(backend.generate(first))
        ttft_cold.append(r1.timings.ttft_s)
        follow = req("what is the title?", history=[*first.messages, Message("assistant", [r1.output.answer or "ok"])])
        r2 = collect(backend.generate(follow))
        ttft_follow.append(r2.timings.ttft_s)
        cached.append(r2.usage.cached_tokens)
    out["ttft_cold_s"] = statistics.median(ttft_cold)
    out["ttft_follow_up_s"] = statistics.median(ttft_follow)
    out["follow_up_cached_tokens"] = cached[-1]
    out["follow_up_phases_ms"] = follow_up_phases(backend, first, req, gpu)

    eng = backend.engine
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    prompt = {"input_ids": processor.tokenizer("a page of text " * 400, return_tensors="pt")["input_ids"][:, :1200]}
    pos3, _ = eng.prompt_positions(prompt)
    from glmv.engine.scheduler import RowParams

    eng.start_row(0, RowParams(), prompt["input_ids"][0])
    eng.prefill(0, prompt, 0, pos3)
    eng.set_row(0, 5, 1200, 1200)

    def timed(fn, n=30) -> float:
        for _ in range(3):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) / n

    def step() -> None:
        eng.decode([0], True)
        eng.set_row(0, 5, 1200, 1200)  # stay at the same length

    draft = list(range(7, 7 + eng.config.spec_tokens + 1))
    step_s = timed(step)
    verify_s = timed(lambda: eng.verify_logits(0, draft, 1200, 1200) if eng.kernels.use_triton else None)
    out["decode_step_b1_ms"] = round(step_s * 1e3, 3)
    out["verify_8_drafts_ms"] = round(verify_s * 1e3, 3) if eng.kernels.use_triton else None
    out["verify_over_step"] = round(verify_s / step_s, 3) if eng.kernels.use_triton else None
    backend.close()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

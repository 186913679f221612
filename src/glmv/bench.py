"""``glmv bench``: time GLM-4.6V-Flash the tutorial's way and glmv's way, against the card's limit.

Without real weights, speed is measured on the full-size GLM-4.6V-Flash architecture with random bf16
weights built directly on the GPU (``--model full-random``), fed real processor output for a real
1288x728 screenshot, with the output length forced so every configuration decodes the same number of
tokens. ``--model tiny --device cpu`` runs the same code in seconds (the test suite does). Also runs as
a script: ``python -m glmv.bench``.

Per configuration: time to first token with the processor and its parts (processor, vision tower, the
rest of prefill, and the next decode step), decode tokens/s at batch 1, aggregate tokens/s at larger
batches, peak GPU memory, warm-up time, and a fresh process's first request after its warm-up; plus the
measured copy bandwidth, the batch-1 limit it implies (bandwidth / bytes of text weights; for the 4-bit
mode, bandwidth / the bytes one of its steps reads), and each figure's ratio to it. Prints a table last
and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .bench_options import DESCRIPTION, add_bench_arguments, resolve
from .errors import GlmvError
from .settings import tune_from_env, tuning_dir
from .tiny import ensure_tiny_checkpoint

FLASH_TEXT = dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                  num_attention_heads=32, num_key_value_heads=2, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [8, 12, 12],
                                   "partial_rotary_factor": 0.5})
FLASH_VISION = dict(depth=24, hidden_size=1536, num_heads=12, intermediate_size=13696, patch_size=14,
                    temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=4096, image_size=336)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float | None:
    """Bytes read + written per second for a 2 GiB device-to-device copy (median of 10)."""
    if not device.startswith("cuda"):
        return None
    n = 2 * 2**30 // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2 * 2**30 / statistics.median(times)


def build_model(kind: str, device: str, dtype: torch.dtype, processor: Any) -> Any:
    """The full-size Flash architecture with random weights (or a checkpoint path / tiny)."""
    from transformers import AutoModelForImageTextToText, Glm4vConfig, Glm4vForConditionalGeneration

    if kind != "full-random":
        path = ensure_tiny_checkpoint() if kind == "tiny" else Path(kind)
        return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>",
                                                     "<|begin_of_video|>", "<|end_of_video|>", "<|endoftext|>")}
    cfg = Glm4vConfig(text_config={**FLASH_TEXT, "pad_token_id": ids["<|endoftext|>"]}, vision_config=FLASH_VISION,
                      image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
                      image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
                      video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Glm4vForConditionalGeneration._from_config(cfg, dtype=dtype)
    # Random init draws from N(0, 0.02); keep activations finite in bf16 like a trained model's would be.
    answer_in_plain_tokens(model, tok)
    return model.eval()


def answer_in_plain_tokens(model: Any, tokenizer: Any) -> None:
    """Zero the output rows of every id the tokenizer cannot show as text (the tiny tokenizer used with the random
    model knows 624 of 151552 ids) and of its special and added tokens: greedy answers then stream as visible
    text without stopping early, so a server's time to first streamed token means what it says. The other
    rows' logits stay random; speed does not depend on these values."""
    keep = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
    keep[: len(tokenizer)] = True
    drop = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    keep[[i for i in drop if i < keep.numel()]] = False
    with torch.no_grad():
        model.lm_head.weight[~keep.to(model.lm_head.weight.device)] = 0


def text_weight_bytes(model: Any) -> int:
    lm = model.model.language_model
    total = sum(p.numel() * p.element_size() for p in lm.parameters())
    return total + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def warm_passes(device: str) -> bool:
    """Whether to run untimed warm-up passes: on a GPU (first-call costs, graph captures); on the CPU the bench
    is a smoke test of the tiny model, where every pass runs the vision tower over the screenshot's patches."""
    return device.startswith("cuda")


def make_inputs(processor: Any, image_path: Path | Any, batch: int, device: str | None = None) -> tuple[dict[str, Any], float]:
    """Processor output for ``batch`` copies of the screenshot prompt, and the processor's seconds (batch 1).
    With a CUDA ``device`` the image is resized and normalised on the GPU, as glmv does."""
    from PIL import Image

    image = image_path if isinstance(image_path, Image.Image) else Image.open(image_path).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe this image"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kw = {"device": "cuda"} if device and device.startswith("cuda") else {}
    t0 = time.perf_counter()
    inputs = processor(text=[text] * batch, images=[image] * batch, return_tensors="pt", padding=True, **kw)
    if kw:
        _sync(device)
    dt = time.perf_counter() - t0
    inputs = dict(inputs)
    inputs.pop("token_type_ids", None)
    return inputs, dt


class _Clock:
    """A generate() streamer that notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.first: float | None = None
        self._calls = 0

    def put(self, value: Any) -> None:
        self._calls += 1
        if self._calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def time_hf(model: Any, inputs: dict[str, Any], n_tokens: int, device: str, static: bool = False) -> dict[str, float]:
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    clock = _Clock()
    kwargs: dict[str, Any] = dict(max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False, streamer=clock)
    if static:
        kwargs["cache_implementation"] = "static"
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)
    _sync(device)
    total = time.perf_counter() - t0
    b = inputs["input_ids"].shape[0]
    gen = out.shape[1] - inputs["input_ids"].shape[1]
    ttft = (clock.first or t0) - t0
    return {"prefill_s": ttft, "total_s": total, "tokens": gen,
            "decode_tok_s": b * (gen - 1) / max(total - ttft, 1e-9)}


def time_engine(engine: Any, inputs: dict[str, Any], n_tokens: int, device: str) -> dict[str, float]:
    """Time one lock-step generation of n_tokens greedy tokens for every row of inputs."""
    from .engine.fast import GREEDY

    b = inputs["input_ids"].shape[0]
    rows = []
    for i in range(b):
        row = {"input_ids": inputs["input_ids"][i : i + 1], "attention_mask": inputs["attention_mask"][i : i + 1]}
        if "mm_token_type_ids" in inputs:
            row["mm_token_type_ids"] = inputs["mm_token_type_ids"][i : i + 1]
        n_img = inputs["image_grid_thw"].shape[0] // b
        grid = inputs["image_grid_thw"][i * n_img : (i + 1) * n_img]
        per = int(grid.prod(-1).sum())
        row["image_grid_thw"] = grid
        row["pixel_values"] = inputs["pixel_values"][i * per : (i + 1) * per]
        rows.append(row)
    stamps: list[float] = []

    def on_tokens(ids: list[int]) -> bool:
        stamps.append(time.perf_counter())
        return False

    _sync(device)
    t0 = time.perf_counter()
    steps = engine.generate(rows, GREEDY, n_tokens, on_tokens)
    _sync(device)
    total = time.perf_counter() - t0
    ttft = stamps[0] - t0
    return {"prefill_s": ttft, "total_s": total, "tokens": steps, "first_at": stamps[0],
            "first_step_s": stamps[1] - stamps[0] if len(stamps) > 1 else None,
            "decode_tok_s": b * (steps - 1) / max(stamps[-1] - stamps[0], 1e-9)}


def ttft(engine: Any, processor: Any, image: Path, device: str, runs: int | None = None) -> dict[str, float]:
    """Median time to first token for the screenshot, processor included, and its parts: the processor,
    the vision tower (timed alone), the rest of prefill (the prompt through the decoder, sampling the first
    token) and the first decode step after it."""
    runs = runs or (5 if device.startswith("cuda") else 1)  # the CPU run is a smoke test: keep it short
    with_proc, prefill, proc, step = [], [], [], []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        inp, dt = make_inputs(processor, image, 1, device)
        r = time_engine(engine, inp, 2, device)
        with_proc.append(r["first_at"] - t0)
        prefill.append(r["prefill_s"])
        proc.append(dt)
        step.append(r["first_step_s"])
    out = {"ttft_with_processor_s": statistics.median(with_proc), "prefill_s": statistics.median(prefill),
           "processor_s": statistics.median(proc), "first_step_s": statistics.median(step)}
    vision = vision_seconds(engine.model, inp, device, engine, runs=3 if warm_passes(device) else 1)
    if vision is not None:
        out["vision_s"] = vision
        out["prompt_prefill_s"] = prompt_prefill_seconds(out["prefill_s"], vision)
    return out


def prompt_prefill_seconds(prefill_s: float, vision_s: float | None) -> float | None:
    """Prefill without the vision tower: the whole prefill minus the tower timed alone. The two are separate
    passes, so under load (another process on the GPU, clocks moving) the tower alone can take longer than the
    whole prefill did; the difference is then not measurable (None, shown as "-"), never a negative time."""
    if vision_s is None:
        return None
    rest = prefill_s - vision_s
    return rest if rest >= 0 else None


def vision_seconds(model: Any, inputs: dict[str, Any], device: str, engine: Any = None, runs: int = 3) -> float | None:
    """Median seconds of the vision tower alone on these inputs, the way ``engine`` runs it (graphed blocks,
    no feature cache) if given (None where the model has no such call)."""
    get = getattr(getattr(model, "model", None), "get_image_features", None)
    if get is None or "pixel_values" not in inputs:
        return None
    pv = inputs["pixel_values"].to(device, model.dtype)
    grid = inputs["image_grid_thw"].to(device)
    if engine is not None and hasattr(engine, "_media_features"):
        get = lambda p, g: engine._media_features("image", p, g, None)  # noqa: E731
    times = []
    with torch.inference_mode():
        for _ in range(runs):
            _sync(device)
            t0 = time.perf_counter()
            get(pv, grid)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_bytes(model: Any) -> int:
    """Bytes one batch-1 decode step reads: the text decoder's weights (int4 buffers included) and the
    lm_head, without the embedding table (one row of it is read)."""
    lm = model.model.language_model
    embed = lm.embed_tokens.weight
    total = sum(t.numel() * t.element_size() for t in list(lm.parameters()) + list(lm.buffers())
                if t.data_ptr() != embed.data_ptr())
    return total + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None


def warmup_child(args: argparse.Namespace, w4: bool = False) -> dict[str, float]:
    """A fresh process (warm on-disk caches): build the engine, then answer the screenshot once (its first
    request) and three more times (warm). Returns warmup_second_s, first_request_ttft_s, warm_ttft_s."""
    cmd = [sys.executable, "-m", "glmv.bench", "--model", args.model, "--device", args.device, "--warmup-only",
           "--max-batch", str(1 if w4 else args.max_batch), "--max-seq-len", str(8192 if w4 else args.max_seq_len),
           "--image", args.image] + (["--w4"] if w4 else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    out = {}
    for line in p.stdout.splitlines():
        for key, name in (("WARMUP_S=", "warmup_second_s"), ("FIRST_TTFT_S=", "first_request_ttft_s"),
                          ("WARM_TTFT_S=", "warm_ttft_s"), ("MEM_GB=", "fresh_model_plus_cache_GB"),
                          ("PEAK_GB=", "fresh_peak_GB")):
            if line.startswith(key):
                out[name] = float(line.split("=", 1)[1])
    if "warmup_second_s" not in out:
        raise RuntimeError(f"warm-up child failed: {p.stderr[-2000:]}")
    return out


def engine_warmup(model: Any, args: argparse.Namespace, processor: Any, max_batch: int | None = None,
                  max_seq_len: int | None = None) -> tuple[Any, float]:
    """Build the engine, tune and capture, and run what glmv's own warm-up runs: a short text answer and
    one for a screenshot-sized image (so the first real request pays no first-call costs)."""
    from PIL import Image

    from .engine.fast import GREEDY, EngineConfig, FastEngine

    t0 = time.perf_counter()
    engine = FastEngine(model, EngineConfig(max_batch=max_batch or args.max_batch,
                                            max_seq_len=max_seq_len or args.max_seq_len,
                                            tune=tune_from_env(), tuning_dir=tuning_dir()))
    engine.capture()
    inputs = dict(processor(text=["[gMASK]<sop><|user|>\nhi<|assistant|>"], return_tensors="pt"))
    inputs.pop("token_type_ids", None)
    engine.generate([inputs], GREEDY, 4, lambda ids: False)
    gray = Image.new("RGB", (1288, 728), (128, 128, 128))
    img_inputs, _ = make_inputs(processor, gray, 1, args.device)
    if engine.fits([img_inputs], 4):
        engine.generate([img_inputs], GREEDY, 4, lambda ids: False)
    _sync(args.device)
    return engine, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """``python -m glmv.bench``: the same options as ``glmv bench`` (declared in :mod:`glmv.bench_options`)."""
    p = argparse.ArgumentParser(prog="glmv bench", description=DESCRIPTION)
    add_bench_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except GlmvError as exc:
        p.error(str(exc))


def run(args: argparse.Namespace) -> int:
    """Run the speed benchmark, or the load benchmark with ``--serve``. With a bare ``--json`` the report is the
    only thing on stdout: whatever else is printed on the way (progress, library messages) goes to stderr."""
    resolve(args, torch.cuda.is_available())
    if args.json_path == "-":
        with contextlib.redirect_stdout(sys.stderr):
            report, table = _measure(args)
    else:
        report, table = _measure(args)
    if report is None:  # --warmup-only: the fresh process has printed its lines
        return 0
    for path in (args.json_out, None if args.json_path == "-" else args.json_path):
        if path:
            Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report) if args.json_path == "-" else table(report), flush=True)
    return 0


def _measure(args: argparse.Namespace) -> tuple[dict[str, Any] | None, Callable[[dict[str, Any]], str]]:
    if args.serve:  # the load benchmark: the server under Poisson arrivals
        from .bench_serve import format_table as load_table
        from .bench_serve import run_load

        return run_load(args), load_table
    return speed(args), format_table


def speed(args: argparse.Namespace) -> dict[str, Any] | None:
    """The speed benchmark's report (None with --warmup-only: that prints the fresh process's lines)."""
    from transformers import AutoProcessor

    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(os.environ.get("GLMV_CACHE", Path.home() / ".cache" / "glmv")) / "triton"))
    on_gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    processor = AutoProcessor.from_pretrained(ensure_tiny_checkpoint())
    model = build_model(args.model, args.device, dtype, processor)
    if args.warmup_only:
        t0 = time.perf_counter()
        if args.w4:
            import gc

            from .engine.w4 import quantize_text_decoder

            quantize_text_decoder(model, args.device)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()  # from here on: what a card running the 4-bit mode holds
        engine, _ = engine_warmup(model, args, processor)
        print(f"WARMUP_S={time.perf_counter() - t0}", flush=True)
        runs = [ttft(engine, processor, Path(args.image), args.device, runs=1)["ttft_with_processor_s"] for _ in range(4)]
        print(f"FIRST_TTFT_S={runs[0]}")
        print(f"WARM_TTFT_S={statistics.median(runs[1:])}")
        print(f"MEM_GB={torch.cuda.memory_allocated() / 1e9}")
        print(f"PEAK_GB={torch.cuda.max_memory_allocated() / 1e9}", flush=True)
        return None

    image = Path(args.image)
    batches = [int(b) for b in args.batches.split(",") if b]
    configs = [c for c in args.configs.split(",") if c]
    bw = copy_bandwidth(args.device)
    wbytes = text_weight_bytes(model)
    limit = bw / wbytes if bw else None
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "date": time.strftime("%Y-%m-%d"), "model": args.model, "image": image.name, "tokens": args.tokens,
        "copy_bandwidth_GBps": None if bw is None else round(bw / 1e9, 1),
        "text_weight_GB": round(wbytes / 1e9, 2), "batch1_limit_tok_s": None if limit is None else round(limit, 1),
        "batches": batches,
        "configs": {},
    }
    inputs1, proc_s = make_inputs(processor, image, 1)
    report["processor_cpu_s"] = round(proc_s, 4)
    if on_gpu:
        make_inputs(processor, image, 1, args.device)  # first call on the GPU pays one-time costs
        report["processor_gpu_s"] = round(statistics.median(make_inputs(processor, image, 1, args.device)[1]
                                                            for _ in range(5)), 4)
    report["processor_s"] = report.get("processor_gpu_s", report["processor_cpu_s"])
    report["prompt_tokens"] = int(inputs1["input_ids"].shape[1])

    def ratio(x: float | None) -> float | None:
        return None if (x is None or limit is None) else round(x / limit, 3)

    for name in configs:
        entry: dict[str, Any] = {}
        try:
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            if name == "tutorial-bf16":
                if warm_passes(args.device):
                    time_hf(model, inputs1, 4, args.device)
                r1 = time_hf(model, inputs1, args.tokens, args.device)
                entry.update(prefill_s=r1["prefill_s"], decode_tok_s_b1=r1["decode_tok_s"])
                for b in batches[1:]:
                    rb = time_hf(model, make_inputs(processor, image, b)[0], args.tokens, args.device)
                    entry[f"aggregate_tok_s_b{b}"] = rb["decode_tok_s"]
            elif name == "glmv-bf16":
                engine, first = engine_warmup(model, args, processor)
                entry["warmup_first_s"] = first
                if on_gpu:
                    try:
                        entry.update(warmup_child(args))
                    except Exception as exc:  # report, keep going
                        entry["warmup_second_error"] = str(exc)[-300:]
                if warm_passes(args.device):
                    time_engine(engine, inputs1, 4, args.device)
                entry.update(ttft(engine, processor, image, args.device))
                entry["step_GB"] = step_bytes(model) / 1e9
                if bw:
                    entry["own_limit_tok_s"] = bw / step_bytes(model)
                r1 = time_engine(engine, inputs1, args.tokens, args.device)
                entry["decode_tok_s_b1"] = r1["decode_tok_s"]
                for b in batches[1:]:
                    if b > args.max_batch:
                        continue
                    inp_b = make_inputs(processor, image, b, args.device)[0]
                    if warm_passes(args.device):  # the first use of this batch size captures its graph
                        time_engine(engine, inp_b, 2, args.device)
                    rb = time_engine(engine, inp_b, args.tokens, args.device)
                    entry[f"aggregate_tok_s_b{b}"] = rb["decode_tok_s"]
                del engine
            elif name == "tutorial-nf4":
                entry.update(_nf4(args, processor, inputs1))
            elif name == "glmv-4bit":
                entry.update(_w4(model, args, processor, image, batches))
            else:
                entry["skipped"] = "not implemented in this build"
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
        entry["peak_gpu_GB"] = peak_gb(args.device)
        entry["ratio_b1"] = ratio(entry.get("decode_tok_s_b1"))
        report["configs"][name] = entry
        # as it goes, on stderr: a run cut short still shows the configurations it finished
        print(json.dumps({name: entry}, default=str), file=sys.stderr, flush=True)
        if on_gpu:
            torch.cuda.empty_cache()

    return report


def _w4(model: Any, args: argparse.Namespace, processor: Any, image: Path, batches: list[int]) -> dict[str, Any]:
    """glmv's 4-bit mode: quantize the text decoder in place (int4, groups of 128), then the fast engine.

    Memory is reported for what a 10 GB card must hold: the model after quantization plus an engine
    with one 8K-token KV cache, and the peak while answering the screenshot prompt."""
    import gc

    from .engine.fast import EngineConfig, FastEngine
    from .engine.w4 import quantize_text_decoder

    t0 = time.perf_counter()
    quantize_text_decoder(model, args.device)
    gc.collect()
    out: dict[str, Any] = {"quantize_s": time.perf_counter() - t0}
    nbytes = step_bytes(model)
    bw = copy_bandwidth(args.device)  # before the peak is reset: its 4 GiB of buffers are not the model's
    out["step_GB"] = nbytes / 1e9
    if bw:
        out["own_limit_tok_s"] = bw / nbytes
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    engine, out["warmup_first_s"] = engine_warmup(model, args, processor, max_batch=1, max_seq_len=8192)
    if args.device.startswith("cuda"):
        try:
            out.update(warmup_child(args, w4=True))
        except Exception as exc:  # report, keep going
            out["warmup_second_error"] = str(exc)[-300:]
    inputs1, _ = make_inputs(processor, image, 1, args.device)
    if warm_passes(args.device):
        time_engine(engine, inputs1, 4, args.device)
    out.update(ttft(engine, processor, image, args.device))
    r1 = time_engine(engine, inputs1, args.tokens, args.device)
    out["decode_tok_s_b1"] = r1["decode_tok_s"]
    if out.get("own_limit_tok_s"):
        out["ratio_own"] = out["decode_tok_s_b1"] / out["own_limit_tok_s"]
    if engine.tuner is not None:
        out["tuned"] = {k: v for k, v in engine.tuner.choice.items() if "w4" in k}
    if args.device.startswith("cuda"):
        out["model_plus_8k_cache_GB"] = torch.cuda.memory_allocated() / 1e9
        out["peak_b1_8k_GB"] = torch.cuda.max_memory_allocated() / 1e9
    del engine
    if any(b > 1 for b in batches):
        engine = FastEngine(model, EngineConfig(max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                                                tune=tune_from_env(), tuning_dir=tuning_dir()))
        for b in batches[1:]:
            if b > args.max_batch:
                continue
            inp_b = make_inputs(processor, image, b, args.device)[0]
            if warm_passes(args.device):  # the first use of this batch size: tuned and captured
                time_engine(engine, inp_b, 2, args.device)
            out[f"aggregate_tok_s_b{b}"] = time_engine(engine, inp_b, args.tokens, args.device)["decode_tok_s"]
        if engine.tuner is not None:
            out["tuned"] = {k: v for k, v in engine.tuner.choice.items() if "w4" in k}
            out["tuner_ms"] = engine.tuner.timings
        del engine
    return out


def _nf4(args: argparse.Namespace, processor: Any, inputs1: dict[str, Any]) -> dict[str, Any]:
    """The tutorial's --int4: save the random model, reload it as bitsandbytes nf4 (double quant, bf16 compute)."""
    import tempfile

    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    if not args.device.startswith("cuda"):
        return {"skipped": "needs CUDA"}
    src = build_model(args.model, args.device, torch.bfloat16, processor)
    with tempfile.TemporaryDirectory(dir=os.environ.get("GLMV_BENCH_TMP")) as d:
        src.save_pretrained(d)
        del src
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForImageTextToText.from_pretrained(d, quantization_config=q, device_map=args.device).eval()
    time_hf(model, inputs1, 4, args.device)
    r1 = time_hf(model, inputs1, min(args.tokens, 64), args.device)
    out = {"prefill_s": r1["prefill_s"], "decode_tok_s_b1": r1["decode_tok_s"],
           "weights_GB": (torch.cuda.memory_allocated() - before) / 1e9}
    del model
    return out


def format_table(report: dict[str, Any]) -> str:
    def f(x: Any, nd: int = 1) -> str:
        return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

    def ms(x: Any) -> str:  # a negative time (a report from before prompt_prefill_seconds) was not measurable
        return "-" if x is None or x < 0 else f"{1e3 * x:.1f}"

    aggs_head = "".join(f"agg b{b} | " for b in report["batches"][1:])
    lines = [
        f"GPU: {report['gpu']}  torch {report['torch']}  transformers {report['transformers']}  {report['date']}",
        f"copy bandwidth {f(report['copy_bandwidth_GBps'])} GB/s, text weights {report['text_weight_GB']} GB -> "
        f"batch-1 limit {f(report['batch1_limit_tok_s'])} tok/s; prompt {report['prompt_tokens']} tokens; "
        f"processor {f(report['processor_s'], 3)} s (CPU {f(report.get('processor_cpu_s'), 3)} s)",
        "| config | TTFT incl. processor (ms) | processor / vision / prompt / first step (ms) | decode tok/s b1 | "
        "limit tok/s | % of limit | " + aggs_head + "peak GB | warm-up 1st / 2nd (s) | fresh process: 1st / warm TTFT (ms) |",
        "|---|---|---|---|---|---|" + "---|" * len(report["batches"][1:]) + "---|---|---|",
    ]
    for name, e in report["configs"].items():
        if "error" in e or "skipped" in e:
            lines.append(f"| {name} | {e.get('error') or e.get('skipped')} |")
            continue
        ttft = e.get("ttft_with_processor_s")
        if ttft is None and e.get("prefill_s") is not None:
            ttft = e["prefill_s"] + report["processor_s"]
        own = e.get("ratio_own")  # the 4-bit mode against its own bytes per token
        limit = e.get("own_limit_tok_s") if own is not None else report["batch1_limit_tok_s"]
        ratio = own if own is not None else e.get("ratio_b1")
        pct = None if ratio is None else 100 * ratio
        split = " / ".join(ms(e.get(k)) for k in ("processor_s", "vision_s", "prompt_prefill_s", "first_step_s"))
        warm = f"{f(e.get('warmup_first_s'))} / {f(e.get('warmup_second_s'))}" if "warmup_first_s" in e else "-"
        fresh = f"{ms(e.get('first_request_ttft_s'))} / {ms(e.get('warm_ttft_s'))}"
        aggs = "".join(f"{f(e.get(f'aggregate_tok_s_b{b}'))} | " for b in report["batches"][1:])
        lines.append(f"| {name} | {ms(ttft)} | {split if 'processor_s' in e else '-'} | {f(e.get('decode_tok_s_b1'))} | "
                     f"{f(limit)} | {f(pct)} | {aggs}{f(e.get('peak_gpu_GB'))} | {warm} | {fresh} |")
    for name, e in report["configs"].items():
        extra = {k: v for k, v in e.items() if k in ("weights_GB", "step_GB", "model_plus_8k_cache_GB", "peak_b1_8k_GB",
                                                     "fresh_model_plus_cache_GB", "fresh_peak_GB", "quantize_s")}
        if extra:
            lines.append(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in extra.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

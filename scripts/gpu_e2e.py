"""The user's path on a GPU, end to end: save a full-size random GLM-4.6V-Flash checkpoint (with the tiny
checkpoint's processor files), then run `glmv ask --model DIR` in bf16 (fast engine), `--quant w4` and
`--int4` (nf4), each as a fresh process, and report tokens/s and the GPU memory each process used.

    PYTHONPATH=src python scripts/gpu_e2e.py /tmp/flash-random
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


def save_checkpoint(path: Path) -> None:
    from transformers import AutoProcessor

    from glmv.bench import build_model
    from glmv.tiny import ensure_tiny_checkpoint

    tiny = ensure_tiny_checkpoint()
    processor = AutoProcessor.from_pretrained(tiny)
    model = build_model("full-random", "cuda", torch.bfloat16, processor)
    model.save_pretrained(path)
    for f in tiny.iterdir():
        if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "generation_config.json", "glmv_tiny.json"):
            shutil.copy(f, path / f.name)
    del model
    torch.cuda.empty_cache()


def gpu_used_gb() -> float:
    q = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                       capture_output=True, text=True)
    return float(q.stdout.strip().splitlines()[0]) * 1.048576 / 1000 if q.returncode == 0 else 0.0


def peak_memory(stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        out.append(gpu_used_gb())
        time.sleep(0.2)


def run(path: Path, *flags: str) -> dict:
    base = gpu_used_gb()  # this process's own CUDA context; the child's use is measured above it
    stop, samples = threading.Event(), []
    t = threading.Thread(target=peak_memory, args=(stop, samples), daemon=True)
    t.start()
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "glmv.cli", "ask", "input/image_3.png", "--model", str(path),
                        "--max-new-tokens", "256", "--json", "--temperature", "0", *flags],
                       capture_output=True, text=True, timeout=900)
    stop.set()
    t.join()
    if p.returncode != 0:
        return {"flags": flags, "error": p.stderr[-1500:]}
    data = json.loads(p.stdout)
    return {"flags": " ".join(flags) or "bf16 (default)", "wall_s": round(time.time() - t0, 1),
            "completion_tokens": data["usage"]["completion_tokens"], "ttft_s": data["timings"]["ttft_s"],
            "tokens_per_s": data["timings"]["tokens_per_s"], "gpu_used_peak_GB": round(max(samples or [base]) - base, 2),
            "log": [line for line in p.stderr.splitlines() if line.startswith("glmv:")][-4:]}


if __name__ == "__main__":
    path = Path(sys.argv[1])
    t0 = time.time()
    save_checkpoint(path)
    print(f"saved in {time.time() - t0:.0f}s", flush=True)
    results = [run(path), run(path, "--quant", "w4"), run(path, "--int4")]
    for r in results:
        print(json.dumps(r), flush=True)
    Path(os.environ.get("OUT", "."), "e2e.json").write_text(json.dumps(results, indent=1))

"""``glmv bench --serve``: the OpenAI-compatible server under load, as users would see it.

Starts the real server (``glmv serve``'s app, on 127.0.0.1) around the fast engine, then sends streamed
chat requests through the official ``openai`` client with Poisson arrivals at several rates. The mix:
questions about a screenshot, follow-up questions on a screenshot already asked about (served from the
prefix cache), and HTML edits (the page's code in the prompt: prompt-lookup speculation drafts from it).
Each request is timed from sending to its first streamed token and to its end. The clients run in a process
of their own (spawned, with one thread per user), so their Python work does not compete with the server's
threads for its interpreter lock: the figures are the server's, as separate users would see them.

Per rate: p50/p99 time to first token, median per-request decode tokens/s, aggregate tokens/s (all tokens
over the wall time), the prefix cache's hit rate (cached prompt tokens / prompt tokens) and the tokens
each draft-verification pass produced. Before the load: the idle time to first token and that of a
follow-up question on the same image.

On CUDA the default model is the full-size GLM-4.6V-Flash architecture with random bf16 weights (speed
does not depend on weight values); ``--model tiny --device cpu`` runs the same code in seconds.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import multiprocessing
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

QUESTIONS = ("What is the title of this page?", "Describe this screenshot.", "List the buttons you can see.",
             "What is the main colour of the header?", "Summarise the text on this page.")
FOLLOW_UPS = ("And what is below it?", "Which link is the most prominent?", "Is there a search box?")
EDITS = ("Make the header dark blue.", "Change the title to 'Quarterly report'.", "Add a footer with a copyright line.")
FIRST_ANSWER = "The page is a dashboard with a header, a navigation bar on the left and a table of orders."


def sample_page() -> str:
    """An HTML page of the kind glmv writes from a screenshot (what an edit request carries)."""
    rows = "".join(f"    <tr><td>#{1000 + i}</td><td>Customer {i}</td><td>{(i * 37) % 500}.00</td><td>shipped</td></tr>\n"
                   for i in range(24))
    return ("<!DOCTYPE html>\n<html>\n<head>\n  <title>Orders</title>\n  <style>\n    body { font-family: sans-serif; }\n"
            "    header { background: #ddd; padding: 12px; }\n    table { border-collapse: collapse; width: 100%; }\n"
            "  </style>\n</head>\n<body>\n  <header><h1>Orders</h1></header>\n  <table>\n"
            f"    <tr><th>Order</th><th>Customer</th><th>Total</th><th>Status</th></tr>\n{rows}  </table>\n</body>\n</html>\n")


def _image_part(png: bytes) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}


def workload(kind: str, png: bytes, rng: random.Random) -> list[dict[str, Any]]:
    """The messages of one request: 'question', 'follow_up' or 'edit'."""
    first = {"role": "user", "content": [_image_part(png), {"type": "text", "text": QUESTIONS[0]}]}
    if kind == "follow_up":  # the same opening turn as every screenshot question: its blocks are cached
        return [first, {"role": "assistant", "content": FIRST_ANSWER}, {"role": "user", "content": rng.choice(FOLLOW_UPS)}]
    if kind == "edit":
        text = f"Here is the HTML of this page:\n```html\n{sample_page()}```\n{rng.choice(EDITS)} Return the whole page."
        return [{"role": "user", "content": [_image_part(png), {"type": "text", "text": text}]}]
    return [{"role": "user", "content": [_image_part(png), {"type": "text", "text": rng.choice(QUESTIONS)}]}]


def one_request(client: Any, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = None
    usage = None
    stream = client.chat.completions.create(model="glmv", messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for ev in stream:
        if first is None and ev.choices and (ev.choices[0].delta.content or getattr(ev.choices[0].delta, "reasoning_content", None)):
            first = time.perf_counter() - t0
        if ev.usage is not None:
            usage = ev.usage
    total = time.perf_counter() - t0
    tokens = usage.completion_tokens if usage else 0
    details = getattr(usage, "prompt_tokens_details", None)
    return {"ttft_s": first if first is not None else total, "total_s": total, "tokens": tokens,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": (getattr(details, "cached_tokens", 0) or 0) if details else 0}


def scrape(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def run_rate(url: str, client: Any, png: bytes, rate: float, n: int, max_tokens: int, mix: list[tuple[str, float]],
             seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    kinds = [rng.choices([k for k, _ in mix], [w for _, w in mix])[0] for _ in range(n)]
    gaps = [rng.expovariate(rate) for _ in range(n)]
    before = scrape(url)
    results: list[dict[str, Any] | None] = [None] * n
    threads = []
    t0 = time.perf_counter()
    at = 0.0
    for i, (kind, gap) in enumerate(zip(kinds, gaps)):
        at += gap if i else 0.0
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        msgs = workload(kind, png, rng)

        def go(i: int = i, msgs: list[dict[str, Any]] = msgs, kind: str = kind) -> None:
            results[i] = {"kind": kind, **one_request(client, msgs, max_tokens)}

        th = threading.Thread(target=go)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    after = scrape(url)
    done = [r for r in results if r is not None]
    ttft = [r["ttft_s"] for r in done]
    per_req = [(r["tokens"] - 1) / (r["total_s"] - r["ttft_s"]) for r in done if r["tokens"] > 1 and r["total_s"] > r["ttft_s"]]

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    spec_steps = delta("glmv_speculative_steps")
    out = {
        "rate_per_s": rate, "requests": len(done), "mix": {k: kinds.count(k) for k, _ in mix},
        "p50_ttft_s": statistics.median(ttft), "p99_ttft_s": pct(ttft, 0.99), "max_ttft_s": max(ttft),
        "per_request_tok_s": statistics.median(per_req) if per_req else None,
        "aggregate_tok_s": sum(r["tokens"] for r in done) / wall, "wall_s": wall,
        "prefix_hit_rate": delta("glmv_cached_prompt_tokens_total") / max(1.0, delta("glmv_prompt_tokens_total")),
        "tokens_per_verify_step": delta("glmv_speculative_tokens") / spec_steps if spec_steps else None,
    }
    for kind, _ in mix:
        ks = [r["ttft_s"] for r in done if r["kind"] == kind]
        out[f"p50_ttft_{kind}_s"] = statistics.median(ks) if ks else None
    return out


def run_users(url: str, client: Any, png: bytes, users: int, rounds: int, max_tokens: int,
              mix: list[tuple[str, float]], seed: int, spread_s: float) -> dict[str, Any]:
    """Closed loop: ``users`` users arrive at random times within ``spread_s`` seconds, each then sending
    ``rounds`` requests one after another (the next as soon as the previous answer ends)."""
    rng = random.Random(seed)
    starts = sorted(rng.uniform(0, spread_s) for _ in range(users))
    names, weights = [k for k, _ in mix], [w for _, w in mix]
    plans = []
    for _ in range(users):
        kinds = [rng.choices(names, weights)[0] for _ in range(rounds)]
        plans.append([(kind, workload(kind, png, rng)) for kind in kinds])
    before = scrape(url)
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def user(u: int) -> None:
        delay = t0 + starts[u] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        for kind, msgs in plans[u]:
            r = {"kind": kind, "user": u, **one_request(client, msgs, max_tokens)}
            with lock:
                results.append(r)

    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    after = scrape(url)
    ttft = [r["ttft_s"] for r in results]
    per_req = [(r["tokens"] - 1) / (r["total_s"] - r["ttft_s"]) for r in results
               if r["tokens"] > 1 and r["total_s"] > r["ttft_s"]]
    prompt = after.get("glmv_prompt_tokens_total", 0.0) - before.get("glmv_prompt_tokens_total", 0.0)
    cached = after.get("glmv_cached_prompt_tokens_total", 0.0) - before.get("glmv_cached_prompt_tokens_total", 0.0)
    out = {"users": users, "rounds": rounds, "spread_s": spread_s, "requests": len(results),
           "mix": {k: sum(r["kind"] == k for r in results) for k, _ in mix},
           "p50_ttft_s": statistics.median(ttft), "p99_ttft_s": pct(ttft, 0.99), "max_ttft_s": max(ttft),
           "per_request_tok_s": statistics.median(per_req) if per_req else None,
           "aggregate_tok_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
           "prefix_hit_rate": cached / max(1.0, prompt)}
    for kind, _ in mix:
        ks = [r["ttft_s"] for r in results if r["kind"] == kind]
        out[f"p50_ttft_{kind}_s"] = statistics.median(ks) if ks else None
    return out


def warm_up(url: str, client: Any, png: bytes, seed: int, max_batch: int) -> None:
    """The first request pays one-time costs; a burst of every kind captures the decode graphs of each batch
    size (and the verification graphs) before anything is timed."""
    rng = random.Random(seed)
    one_request(client, workload("question", png, rng), 4)
    burst = [threading.Thread(target=one_request, args=(client, workload(kind, png, rng), 8))
             for kind in ("question", "follow_up", "edit") * max_batch][:max_batch]
    for th in burst:
        th.start()
    for th in burst:
        th.join()


def idle_and_follow_up(url: str, client: Any, png: bytes, tokens: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A screenshot question with nothing else running, then a follow-up on the same screenshot."""
    idle = one_request(client, workload("question", png, random.Random(1)), tokens)
    return idle, one_request(client, workload("follow_up", png, random.Random(1)), tokens)


PHASES = {f.__name__: f for f in (warm_up, idle_and_follow_up, run_users, run_rate)}


def _client_phase(name: str, url: str, *args: Any) -> Any:
    """In the client process: one phase of the benchmark, through its own ``openai`` client."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    return PHASES[name](url, client, *args)


def build_backend(args: argparse.Namespace) -> Any:
    import torch
    from transformers import AutoProcessor

    from .backends.local import LocalBackend
    from .bench import build_model
    from .settings import Settings, tune_from_env
    from .tiny import ensure_tiny_checkpoint

    on_gpu = args.device.startswith("cuda")
    settings = Settings(model=args.model, engine="fast", device="cuda" if on_gpu else "cpu", max_seq_len=args.max_seq_len,
                        tune=tune_from_env())
    processor = AutoProcessor.from_pretrained(ensure_tiny_checkpoint())
    model = build_model(args.model, args.device, torch.bfloat16 if on_gpu else torch.float32, processor)
    return LocalBackend.from_model(model, processor, settings, log=lambda line: print(line, file=sys.stderr),
                                   max_batch=args.max_batch)


def format_table(report: dict[str, Any]) -> str:
    def f(x: Any, nd: int = 3) -> str:
        return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

    lines = [f"idle TTFT {f(report['idle_ttft_s'])} s, follow-up on the same image {f(report['follow_up_ttft_s'])} s "
             f"({report['follow_up_cached_tokens']} cached tokens), idle decode {f(report.get('idle_tok_s'), 1)} tok/s"]
    loop = report.get("closed_loop")
    if loop:
        lines.append(f"closed loop, {loop['users']} users x {loop['rounds']} requests: p50/p99 TTFT "
                     f"{f(loop['p50_ttft_s'])}/{f(loop['p99_ttft_s'])} s ({f(loop['p99_over_idle_ttft'], 2)}x idle), "
                     "aggregate "
                     f"{f(loop['aggregate_tok_s'], 1)} tok/s ({f(loop['aggregate_over_idle_tok_s'], 2)}x idle decode), "
                     f"prefix hit rate {f(loop['prefix_hit_rate'], 2)}")
    lines += ["| rate/s | requests | p50 TTFT s | p99 TTFT s | per-request tok/s | aggregate tok/s | prefix hit rate "
              "| tokens/verify |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["rates"]:
        lines.append(f"| {r['rate_per_s']} | {r['requests']} | {f(r['p50_ttft_s'])} | {f(r['p99_ttft_s'])} | "
                     f"{f(r['per_request_tok_s'], 1)} | {f(r['aggregate_tok_s'], 1)} | {f(r['prefix_hit_rate'], 2)} | "
                     f"{f(r['tokens_per_verify_step'], 2)} |")
    return "\n".join(lines)


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    """The report of the load benchmark; ``args`` as :func:`glmv.bench_options.resolve` leaves them. Progress
    (one JSON line per rate) goes to stderr: stdout is for the table or, with ``--json``, the report."""
    gpu = args.device.startswith("cuda")
    rates = [float(x) for x in args.rates.split(",")]
    n, tokens = args.requests, args.tokens
    mix = [(k, float(w)) for k, w in (part.split(":") for part in args.mix.split(","))]

    import torch
    from PIL import Image

    from .server.app import ServerConfig, build_app

    img = Image.open(args.image).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    png = buf.getvalue()
    backend = build_backend(args)
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(backend, ServerConfig(model_name="glmv", max_queue=1024)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    # spawned, not forked: the server's process has the inference and server threads running
    clients = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))

    def phase(name: str, *phase_args: Any) -> Any:
        return clients.submit(_client_phase, name, url, *phase_args).result()

    try:
        deadline = time.time() + 60
        while not server.started:
            if time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        phase("warm_up", png, args.seed, args.max_batch)
        backend.batcher.cache.clear()
        idle, follow = phase("idle_and_follow_up", png, tokens)
        report: dict[str, Any] = {
            "model": args.model, "device": torch.cuda.get_device_name() if gpu else "cpu", "tokens": tokens,
            "idle_ttft_s": idle["ttft_s"], "idle_prompt_tokens": idle["prompt_tokens"],
            "follow_up_ttft_s": follow["ttft_s"], "follow_up_cached_tokens": follow["cached_tokens"],
            "idle_tok_s": (idle["tokens"] - 1) / max(1e-9, idle["total_s"] - idle["ttft_s"]),
            "rates": [],
        }
        if args.users:
            loop = phase("run_users", png, args.users, args.rounds, tokens, mix, args.seed, args.spread)
            loop["p99_over_idle_ttft"] = loop["p99_ttft_s"] / report["idle_ttft_s"]
            loop["aggregate_over_idle_tok_s"] = loop["aggregate_tok_s"] / report["idle_tok_s"]
            print(json.dumps(loop), flush=True)
            report["closed_loop"] = loop
        for i, rate in enumerate(rates):
            r = phase("run_rate", png, rate, n, tokens, mix, args.seed + i)
            print(json.dumps(r), file=sys.stderr, flush=True)
            report["rates"].append(r)
    finally:
        clients.shutdown(cancel_futures=True)
        server.should_exit = True
        thread.join(10)
        backend.close()
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m glmv.bench_serve``: ``glmv bench --serve`` (the options are glmv bench's)."""
    from .bench import main as bench_main

    return bench_main(["--serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())

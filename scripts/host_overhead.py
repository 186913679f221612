"""Where a serving decode step's time goes besides the model: host-side work per step and per row.

Runs the real serving path (``LocalBackend`` with ``--engine fast``: backends/scheduler.py's inference thread,
engine/scheduler.py's ``Batcher``, the fast engine) on the tiny model, with 1 and 8 concurrent requests, and
times every decode step on the inference thread:

- ``period``: from one step's start to the next one's (what a decoding user waits per token: the step itself,
  the scheduler loop around it, and waiting for the GIL held by the consumer threads);
- ``forward``: the engine's device call (``FastEngine.decode``: the model step, sampling, the device-to-host
  copy of the new tokens);
- ``host``: ``period - forward``, also per decoding row.

Only steps where every request decodes (no prefill chunk, no draft verification) are counted. Also reported:
the CPU time per generated token of each kind of thread (the inference thread; the consumers that detokenize
and assemble chunks; the server's event loop; the clients, when they run in this process).

``--device-ms 8`` stretches every decode call to 8 ms with the GIL released (``time.sleep``), as a GPU step
waits in ``cudaStreamSynchronize``: what the step takes beyond that is the serving loop's cost, including the
wait for the GIL when the thread wants it back (the GIL hand-off the GPU suffers from). ``--server`` also runs
the requests through the real HTTP server with the official ``openai`` client, the clients in a separate
process (``--clients-in-server``: on threads inside the server's process, as the load benchmark used to);
``--rounds``/``--image`` make requests arrive (and be parsed) while others decode; ``--busy`` keeps a thread
busy in pure Python meanwhile. ``--profile`` prints the inference thread's top functions (cProfile).

This is a CPU proxy: the tiny model's forward is small and the machine's other load shows in every figure;
it is not a GPU measurement.

    PYTHONPATH=src python scripts/host_overhead.py [--rows 1,8] [--tokens 96] [--server] [--device-ms 8] [--json]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import multiprocessing
import pstats
import statistics
import sys
import threading
import time
from typing import Any


class ThreadCPU:
    """CPU seconds used by the threads that ran to their end, by role (from ``time.thread_time`` in each)."""

    ROLES = {"glmv-request": "consumer", "consumer": "consumer", "server-loop": "event loop", "client": "client"}

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self._lock = threading.Lock()
        self._run = threading.Thread.run
        account = self

        def run(thread: threading.Thread) -> None:
            t = time.thread_time()
            try:
                account._run(thread)
            finally:
                role = account.ROLES.get(thread.name)
                if role is not None:
                    with account._lock:
                        account.cpu[role] = account.cpu.get(role, 0.0) + time.thread_time() - t

        threading.Thread.run = run  # type: ignore[method-assign]

    def restore(self) -> None:
        threading.Thread.run = self._run  # type: ignore[method-assign]


class StepTimer:
    """Wraps the batcher's ``step`` and the engine's ``decode`` on the inference thread."""

    def __init__(self, backend: Any, profile: bool, device_ms: float = 0.0) -> None:
        self.backend = backend
        self.records: list[tuple[float, float, int, bool]] = []  # (start, forward, rows, pure decode)
        self.wakes: list[float] = []  # with device_ms: per counted step, how late the thread ran again
        self.profiler = cProfile.Profile() if profile else None
        self._forward = 0.0
        self._wake = 0.0
        self._rows = 0
        self.cpu = 0.0  # the inference thread's CPU seconds inside steps
        self.threads = ThreadCPU()
        batcher, engine = backend.batcher, backend.engine
        self._step, self._decode = batcher.step, engine.decode

        def decode(rows: list[int], greedy: bool | None = None) -> list[int]:
            t = time.perf_counter()
            out = self._decode(rows, greedy)
            if device_ms:  # a GPU's step: the thread waits with the GIL released (as in a CUDA synchronize)
                end = t + device_ms / 1e3
                time.sleep(max(0.0, end - time.perf_counter()))
                self._wake = max(0.0, time.perf_counter() - end)  # device done -> this thread runs again
            self._forward += time.perf_counter() - t
            self._rows = len(rows)
            return out

        def step() -> None:
            self._forward, self._rows, self._wake = 0.0, 0, 0.0
            pure = not batcher.prefilling
            spec0 = batcher.spec_steps
            t, c = time.perf_counter(), time.thread_time()
            if self.profiler is not None:
                self.profiler.enable()
            try:
                self._step()
            finally:
                if self.profiler is not None:
                    self.profiler.disable()
            self.cpu += time.thread_time() - c
            self.records.append((t, self._forward, self._rows, pure and batcher.spec_steps == spec0))
            self.wakes.append(self._wake)

        engine.decode, batcher.step = decode, step

    def restore(self) -> None:
        self.threads.restore()
        self.backend.batcher.step, self.backend.engine.decode = self._step, self._decode

    def summary(self, rows: int) -> dict[str, Any]:
        """Median per-step figures over the steps where exactly ``rows`` requests decoded."""
        periods, forwards, wakes = [], [], []
        for (t, fwd, n, pure), (t_next, *_), wake in zip(self.records, self.records[1:], self.wakes):
            if n == rows and pure:
                periods.append(t_next - t)
                forwards.append(fwd)
                wakes.append(wake)
        if not periods:
            return {"rows": rows, "steps": 0}
        period, forward = statistics.median(periods), statistics.median(forwards)
        mean = statistics.fmean(periods)
        host = statistics.median(p - f for p, f in zip(periods, forwards))
        every = [w for (_, _, n, pure), w in zip(self.records, self.wakes) if n and pure]
        tokens = sum(n for _, _, n, _ in self.records)  # every decoded token, for CPU per token
        cpu = {"inference": self.cpu, **self.threads.cpu}
        return {"rows": rows, "steps": len(periods), "period_ms": period * 1e3, "forward_ms": forward * 1e3,
                "host_ms": host * 1e3, "host_ms_per_row": host * 1e3 / rows, "tok_s": rows / period,
                "period_ms_mean": mean * 1e3, "tok_s_mean": rows / mean,
                "wake_ms": statistics.median(wakes) * 1e3, "wake_ms_mean": statistics.fmean(wakes) * 1e3,
                "all_decode_steps": len(every), "all_wake_ms_mean": statistics.fmean(every) * 1e3,
                "all_wake_ms_max": max(every) * 1e3,
                "cpu_ms_per_token": {k: v * 1e3 / max(1, tokens) for k, v in cpu.items()}}


def requests(backend: Any, n: int, tokens: int) -> list[Any]:
    from glmv.backends.base import GenerationRequest
    from glmv.prompts import user_message

    # distinct prompts (no shared prefix), greedy, no speculation: every row decodes every step
    return [GenerationRequest([user_message(f"request {i}: write a long story about the number {i}", [])],
                              sampling=backend.default_sampling.merged(max_new_tokens=tokens, temperature=0),
                              speculate=False) for i in range(n)]


def ignore_eos(backend: Any) -> None:
    """Random tiny weights may sample a stop token early; every row should run its whole length."""
    backend.eos_ids = lambda: {-1}


def in_process(backend: Any, n: int, tokens: int) -> None:
    from glmv.backends.base import collect

    threads = [threading.Thread(target=lambda r=r: collect(backend.generate(r)), name="consumer")
               for r in requests(backend, n, tokens)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def _client(url: str, n: int, tokens: int, rounds: int = 1, image: str | None = None) -> None:
    """The openai clients: ``n`` users at once, each on its own thread sending ``rounds`` streamed requests
    back to back (with ``image``, a PNG sent with each: the server parses and processes it while others decode)."""
    import base64

    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    parts: list[dict[str, Any]] = []
    if image:
        with open(image, "rb") as f:
            parts = [{"type": "image_url",
                      "image_url": {"url": "data:image/png;base64," + base64.b64encode(f.read()).decode()}}]

    def one(i: int) -> None:
        for r in range(rounds):
            text = f"request {i}.{r}: write a long story about the number {i}"
            stream = client.chat.completions.create(
                model="glmv", max_tokens=tokens, temperature=0, stream=True,
                messages=[{"role": "user", "content": [*parts, {"type": "text", "text": text}]}])
            for _ in stream:
                pass

    threads = [threading.Thread(target=one, args=(i,), name="client") for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def through_server(backend: Any, n: int, tokens: int, separate: bool, rounds: int = 1, image: str | None = None) -> None:
    import socket

    import uvicorn

    from glmv.server.app import ServerConfig, build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(backend, ServerConfig(model_name="glmv", max_queue=1024)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="server-loop")
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        if separate:
            proc = multiprocessing.get_context("spawn").Process(target=_client, args=(url, n, tokens, rounds, image))
            proc.start()
            proc.join()
        else:
            _client(url, n, tokens, rounds, image)
    finally:
        server.should_exit = True
        thread.join(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,8", help="concurrent requests, comma-separated (default 1,8)")
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per request (default 96)")
    ap.add_argument("--server", action="store_true", help="also through the HTTP server with the openai client")
    ap.add_argument("--clients-in-server", action="store_true", help="with --server: client threads in this process")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --server: requests per user, back to back (new requests arrive while others decode)")
    ap.add_argument("--image", help="with --server: a PNG sent with every request (parsed and processed by the server)")
    ap.add_argument("--busy", action="store_true",
                    help="a thread busy in pure Python meanwhile (as a request being parsed, an image processed, "
                         "client threads in the server's process)")
    ap.add_argument("--profile", action="store_true", help="print the inference thread's top functions")
    ap.add_argument("--device-ms", type=float, default=0.0,
                    help="stretch each decode call to this many ms with the GIL released, as a GPU step waits "
                         "(6: an H200's batch-8 step); 'host' is then what comes on top")
    ap.add_argument("--switch-interval", type=float, help="sys.setswitchinterval after loading (seconds)")
    ap.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    args = ap.parse_args(argv)

    from glmv.backends.local import LocalBackend
    from glmv.settings import Settings
    from glmv.tiny import ensure_tiny_checkpoint

    rows = [int(x) for x in args.rows.split(",")]
    backend = LocalBackend(Settings(model=str(ensure_tiny_checkpoint()), engine="fast"), log=lambda m: None,
                           max_batch=max(rows)).load()
    ignore_eos(backend)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    report: dict[str, Any] = {"machine": "cpu", "tokens": args.tokens, "device_ms": args.device_ms, "busy": args.busy, "switch_interval_s": sys.getswitchinterval(),
                              "results": []}
    modes = [("in-process", None)]
    if args.server:
        modes.append(("server", not args.clients_in_server))
    try:
        in_process(backend, 2, 8)  # warm-up
        for mode, separate in modes:
            for n in rows:
                timer = StepTimer(backend, args.profile, args.device_ms)
                stop = threading.Event()
                if args.busy:
                    threading.Thread(target=lambda: [sum(range(100)) for _ in iter(stop.is_set, True)],
                                     daemon=True).start()
                try:
                    if separate is None:
                        in_process(backend, n, args.tokens)
                    else:
                        through_server(backend, n, args.tokens, separate, args.rounds, args.image)
                finally:
                    stop.set()
                    timer.restore()
                backend.batcher.cache.clear()
                res = {"mode": mode + ("" if separate in (None, True) else " (clients in-process)"), **timer.summary(n)}
                report["results"].append(res)
                if not args.json:
                    print(f"{res['mode']:32s} rows {n}: " + (
                        f"step {res['period_ms']:.2f} ms = forward {res['forward_ms']:.2f} + host {res['host_ms']:.2f} "
                        f"({res['host_ms_per_row']:.2f}/row) (medians), {res['tok_s']:.0f} tok/s; mean step "
                        f"{res['period_ms_mean']:.2f} ms over {res['steps']} steps"
                        + (f"; past the device time the thread ran {res['wake_ms']:.2f} ms late (median; mean "
                           f"{res['wake_ms_mean']:.2f}; over all {res['all_decode_steps']} decode steps mean "
                           f"{res['all_wake_ms_mean']:.2f}, max {res['all_wake_ms_max']:.2f})" if args.device_ms else "")
                        if res["steps"] else "no steps with every row decoding"), flush=True)
                    if res["steps"]:
                        print(" " * 33 + "CPU ms per token: " + ", ".join(
                            f"{k} {v:.3f}" for k, v in res["cpu_ms_per_token"].items()), flush=True)
                if timer.profiler is not None and not args.json:
                    buf = io.StringIO()
                    pstats.Stats(timer.profiler, stream=buf).sort_stats("tottime").print_stats(14)
                    print(buf.getvalue(), file=sys.stderr)
    finally:
        backend.close()
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

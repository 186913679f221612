"""``glmv bench``'s options, declared once and without importing torch.

``glmv bench --help`` (a subcommand of ``glmv``) and ``python -m glmv.bench`` parse the same options, for
both benchmarks: the speed benchmark (the default, :mod:`glmv.bench`) and the load benchmark
(``--serve``, :mod:`glmv.bench_serve`). Options whose default depends on the benchmark or the device
default to None here and are resolved by :func:`resolve` once torch says whether CUDA is there.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .errors import GlmvError

SPEED_CONFIGS = ("tutorial-bf16", "tutorial-nf4", "glmv-bf16", "glmv-4bit")
DEFAULT_MIX = "question:0.5,follow_up:0.3,edit:0.2"
DEFAULT_IMAGE = Path(__file__).resolve().parents[2] / "input" / "image_3.png"
# Options that belong to one benchmark only: given to the other, they would do nothing, so they are refused.
SPEED_ONLY = ("batches", "configs")
LOAD_ONLY = ("rates", "requests", "mix", "seed", "engine", "users", "rounds", "spread")

DESCRIPTION = ("Time GLM-4.6V-Flash the tutorial's way and glmv's way against the GPU's bandwidth limit "
               "(default), or the OpenAI-compatible server under load (--serve). Without real weights the "
               "full-size architecture runs with random weights; --model tiny --device cpu runs the same code "
               "in about a minute.")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serve", action="store_true",
                   help="the load benchmark: the real server, streamed requests with Poisson arrivals (p50/p99 "
                        "TTFT, tokens/s, prefix-cache hit rate) instead of the speed benchmark")
    g = p.add_argument_group("both benchmarks")
    g.add_argument("--model", default=None, metavar="MODEL",
                   help="full-random (the full-size architecture, random weights), tiny, or a checkpoint folder "
                        "(default full-random; with --serve on the CPU: tiny)")
    g.add_argument("--device", default=None, help="cuda | cpu (default: cuda when there is one)")
    g.add_argument("--image", default=str(DEFAULT_IMAGE), metavar="PNG",
                   help="the screenshot (default input/image_3.png, 1288x728)")
    g.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="tokens per answer: forced output length, or --serve's max_tokens "
                        "(default 128 on CUDA; 8 on the CPU, 12 with --serve)")
    g.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="rows in the engine's cache (default: the largest --batches; 8 with --serve)")
    g.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="tokens per row of the cache (default 2048; 4096 with --serve)")
    g.add_argument("--json", dest="json_path", nargs="?", const="-", default=None, metavar="FILE",
                   help="print the report as one JSON object on stdout instead of the table, and nothing else "
                        "there (progress goes to stderr); --json FILE, the older spelling, writes it to FILE and "
                        "prints the table")
    g.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON object to FILE")
    g = p.add_argument_group("speed benchmark (default)")
    g.add_argument("--batches", default=None, metavar="B,B,...",
                   help="batch sizes for aggregate tokens/s (default 1,8,32 on CUDA; 1,2 on the CPU)")
    g.add_argument("--configs", default=None, metavar="NAME,...",
                   help=f"what to time (default all: {','.join(SPEED_CONFIGS)})")
    g = p.add_argument_group("load benchmark (--serve)")
    g.add_argument("--rates", default=None, metavar="R,R,...",
                   help="arrival rates in requests/s (default 1,2,4,8 on CUDA; 2,4 on the CPU)")
    g.add_argument("--requests", type=int, default=None, metavar="N",
                   help="requests per rate (default 32 on CUDA; 6 on the CPU)")
    g.add_argument("--mix", default=None, metavar="KIND:W,...",
                   help=f"request kinds and weights: question, follow_up, edit (default {DEFAULT_MIX})")
    g.add_argument("--seed", type=int, default=None, help="seed of the arrival times and the mix (default 0)")
    g.add_argument("--engine", choices=["fast"], default=None, help="the server's engine (the fast engine only)")
    g.add_argument("--users", type=int, default=None, metavar="N",
                   help="also run a closed loop of N users arriving within --spread seconds, each sending --rounds "
                        "requests back to back (default: no closed loop)")
    g.add_argument("--rounds", type=int, default=None, metavar="R", help="requests per user in the closed loop (default 4)")
    g.add_argument("--spread", type=float, default=None, metavar="S",
                   help="seconds over which the closed loop's users arrive (default 2)")
    p.add_argument("--warmup-only", action="store_true", help=argparse.SUPPRESS)  # the speed benchmark's fresh process
    p.add_argument("--w4", action="store_true", help=argparse.SUPPRESS)  # with --warmup-only: the 4-bit mode


def resolve(args: argparse.Namespace, has_cuda: bool) -> argparse.Namespace:
    """Refuse options of the other benchmark, then fill the defaults that depend on the benchmark and device."""
    serve = args.serve
    for dest in SPEED_ONLY if serve else LOAD_ONLY:
        if getattr(args, dest) is not None:
            flag = "--" + dest.replace("_", "-")
            other = "speed benchmark (without --serve)" if serve else "load benchmark: add --serve"
            raise GlmvError(f"{flag} applies to the {other}")
    for dest in ("tokens", "max_batch", "max_seq_len", "requests", "rounds"):
        value = getattr(args, dest, None)
        if value is not None and value < 1:
            raise GlmvError(f"--{dest.replace('_', '-')} must be at least 1")
    for dest, kind in (("batches", int), ("rates", float)):
        if getattr(args, dest) is not None:
            _positive_list(f"--{dest}", getattr(args, dest), kind)
    if args.mix is not None:
        try:
            weights = dict((k.strip(), float(w)) for k, w in (part.split(":") for part in args.mix.split(",")))
        except ValueError:
            weights = {}
        if not weights or not set(weights) <= {"question", "follow_up", "edit"} or min(weights.values()) < 0:
            raise GlmvError(f"--mix '{args.mix}': give kind:weight pairs, e.g. {DEFAULT_MIX}")
    args.device = args.device or ("cuda" if has_cuda else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise GlmvError(f"--device '{args.device}': give cuda, cuda:N or cpu")
    if args.device.startswith("cuda") and not has_cuda:
        raise GlmvError(f"--device {args.device}: no CUDA GPU is visible here; use --device cpu (with --model tiny)")
    gpu = args.device.startswith("cuda")
    if serve:
        args.model = args.model or ("full-random" if gpu else "tiny")
        args.tokens = args.tokens or (128 if gpu else 12)
        args.max_batch = args.max_batch or 8
        args.max_seq_len = args.max_seq_len or 4096
        args.rates = args.rates or ("1,2,4,8" if gpu else "2,4")
        args.requests = args.requests or (32 if gpu else 6)
        args.mix = args.mix or DEFAULT_MIX
        args.seed = 0 if args.seed is None else args.seed
        args.engine = args.engine or "fast"
        if (args.users is not None and args.users < 0) or (args.spread is not None and not args.spread >= 0):
            raise GlmvError("--users and --spread must be 0 or more")
        args.users = args.users or 0
        args.rounds = args.rounds or 4
        args.spread = 2.0 if args.spread is None else args.spread
    else:
        args.model = args.model or "full-random"
        args.tokens = args.tokens or (128 if gpu else 8)
        args.batches = args.batches or ("1,8,32" if gpu else "1,2")
        args.configs = args.configs or ",".join(SPEED_CONFIGS)
        args.max_batch = args.max_batch or max(int(b) for b in args.batches.split(",") if b)
        args.max_seq_len = args.max_seq_len or 2048
    return args


def _positive_list(flag: str, text: str, kind: type) -> None:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise GlmvError(f"{flag} '{text}': give numbers above 0 separated by commas, e.g. 1,8,32")

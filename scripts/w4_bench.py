"""Time the int4 products against each other on the decoder's shapes (run on a CUDA GPU).

    PYTHONPATH=src python scripts/w4_bench.py [--old PATH_TO_OLD_PACKAGE_PARENT] [--json out.json]

For each shape of the GLM-4.6V-Flash text decoder and each batch size: glmv's int4 kernels (every
block-size configuration the tuner knows, best reported), optionally the previous build's kernels
(``--old``: a folder holding a ``glmv_main`` copy of the old package), torch's own int4 tinygemm
(``aten._weight_int4pack_mm``, same scales + zeros group-128 format), and bf16 cuBLAS. Each product is
timed inside a CUDA graph over enough weight copies to spill the L2, as in a decode step; GB/s counts the
weight bytes read. Checks each kernel against the dequantized weights first.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F

SHAPES = [("qkv", 4608, 4096, True), ("o", 4096, 4096, False), ("gate_up", 27392, 4096, False),
          ("down", 4096, 13696, False)]
ROWS = [1, 2, 4, 8, 16, 32]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def graph_ms(calls, reps: int = 20) -> float:
    """Median ms per call of ``calls`` (one each) replayed as one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    del g
    return statistics.median(times) / len(calls)


def copy_bw() -> float:
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * a.numel() / (graph_ms([lambda: b.copy_(a)] * 4) / 1e3) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    args = ap.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    from glmv.engine import w4 as new

    old = None
    if args.old:
        sys.path.insert(0, args.old)
        old = importlib.import_module("glmv_main.engine.w4")
    torch.manual_seed(0)
    bw = copy_bw()
    print(f"GPU {torch.cuda.get_device_name()} copy bandwidth {bw:.0f} GB/s", flush=True)
    results: dict = {"gpu": torch.cuda.get_device_name(), "copy_GBps": bw, "shapes": {}}
    ok = True
    for name, n, k, has_bias in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1 if has_bias else None
        p, s, m = new.quantize_w4(w)
        wd = new.dequantize_w4(p, s, m)
        q4_bytes = p.numel() + 2 * s.numel() * 2
        copies = max(2, min(32, math.ceil(300e6 / q4_bytes)))
        cp = [(p.clone(), s.clone(), m.clone()) for _ in range(copies)]
        bf_copies = max(2, min(32, math.ceil(300e6 / (2 * n * k))))
        wb = [wd.clone() for _ in range(bf_copies)]
        # tinygemm: w = (q - 8) * scale + zero, zero = min + 8 * scale; scales and zeros [G, N, 2] bf16
        tg = None
        try:
            q = new.unpack_codes(p).to(torch.int32)
            tq = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
            sz = torch.stack([s.to(torch.bfloat16), (m.float() + 8 * s.float()).to(torch.bfloat16)], 2).transpose(0, 1).contiguous()
            tg = {kt: torch.ops.aten._convert_weight_to_int4pack(tq, kt) for kt in (4, 8)}
        except Exception as exc:
            print(f"tinygemm unavailable: {type(exc).__name__}: {exc}"[:300])
        old_w = None
        if old is not None:
            op, os_, om = old.quantize_w4(w)
            old_w = [(op.clone(), os_.clone(), om.clone()) for _ in range(copies)]
        entry: dict = {"n": n, "k": k, "int4_bytes": q4_bytes, "rows": {}}
        for r in rows_list:
            x = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, wd, bias)
            row: dict = {}
            cfgs = new.configs_for(r) if hasattr(new, "configs_for") else (
                new.GEMV_CONFIGS if r == 1 else [c for c in new.GEMM_CONFIGS if c[0] <= max(16, r)])
            best = (None, float("inf"))
            for cfg in cfgs:
                try:
                    err = rel(new.w4_linear(x, p, s, m, bias, config=cfg), ref)
                except Exception as exc:
                    row[f"new{cfg}"] = f"fail {type(exc).__name__}: {exc}"[:200]
                    continue
                if not err < 1e-2:
                    ok = False
                    row[f"new{cfg}"] = f"WRONG rel.err {err:.2e}"
                    continue
                t = graph_ms([lambda a=a, c=cfg: new.w4_linear(x, *a, bias, config=c) for a in cp])
                row[f"new{cfg}"] = t
                if t < best[1]:
                    best = (cfg, t)
            row["new_best"] = best[1]
            row["new_best_cfg"] = best[0]
            row["bf16_cublas"] = graph_ms([lambda ww=ww: F.linear(x, ww, bias) for ww in wb])
            if tg is not None:
                for kt, tw in tg.items():
                    try:
                        out = torch.ops.aten._weight_int4pack_mm(x, tw, 128, sz)
                        if bias is not None:
                            out = out + bias
                        err = rel(out, ref)
                        twc = [tw.clone() for _ in range(copies)]
                        row[f"tinygemm_k{kt}"] = graph_ms([lambda t_=t_: torch.ops.aten._weight_int4pack_mm(x, t_, 128, sz) for t_ in twc])
                        row[f"tinygemm_k{kt}_err"] = err
                        del twc
                    except Exception as exc:
                        row[f"tinygemm_k{kt}"] = f"fail {exc}"[:200]
            if old_w is not None:
                oref = F.linear(x, old.dequantize_w4(*old_w[0]), bias)
                if r == 1:
                    ob = float("inf")
                    for cfg in old.GEMV_CONFIGS:
                        try:
                            if rel(old.w4_linear(x, *old_w[0], bias, config=cfg), oref) > 1e-2:
                                continue
                            ob = min(ob, graph_ms([lambda a=a, c=cfg: old.w4_linear(x, *a, bias, config=c) for a in old_w]))
                        except Exception:
                            continue
                    row["old_best"] = ob
                else:
                    row["old_best"] = graph_ms([lambda a=a: old.w4_linear(x, *a, bias) for a in old_w])
            entry["rows"][r] = row
            gbs = q4_bytes / (best[1] / 1e3) / 1e9
            print(f"{name:8s} r{r:2d}: new {best[1]*1e3:7.1f} us ({gbs:6.0f} GB/s, {best[0]}) | "
                  f"old {row.get('old_best', float('nan'))*1e3:7.1f} | tinygemm k8 "
                  f"{(row.get('tinygemm_k8') if isinstance(row.get('tinygemm_k8'), float) else float('nan'))*1e3:7.1f} | "
                  f"bf16 {row['bf16_cublas']*1e3:7.1f} us", flush=True)
        results["shapes"][name] = entry
        if args.json:  # after each shape, so a run cut short still leaves its timings
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
        del cp, wb, old_w, tg
        torch.cuda.empty_cache()
    # one decode step's products (x 40 layers), per method and batch size
    print("\nper-token int4 products (40 layers, ms) and GB/s of the int4 bytes:")
    total_bytes = 40 * sum(e["int4_bytes"] for e in results["shapes"].values())
    for r in rows_list:
        line = f"rows {r:2d}:"
        for meth in ("new_best", "old_best", "tinygemm_k8", "tinygemm_k4", "bf16_cublas"):
            vals = [e["rows"][r].get(meth) for e in results["shapes"].values()]
            if all(isinstance(v, float) for v in vals):
                ms = 40 * sum(vals)
                extra = f" ({total_bytes / (ms / 1e3) / 1e9:.0f} GB/s)" if meth != "bf16_cublas" else ""
                line += f" {meth} {ms:.2f}{extra};"
        print(line)
    print("W4_BENCH_OK" if ok else "W4_BENCH_WRONG")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

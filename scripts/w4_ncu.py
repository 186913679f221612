"""A few int4 kernel launches for Nsight Compute (run on a CUDA GPU under ncu).

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats -k regex:w4_ \\
        python3 scripts/w4_ncu.py

Each (shape, rows, config) below is launched twice (the first compiles), on fresh random weights.
"""

from __future__ import annotations

import torch

from glmv.engine.w4 import quantize_w4, w4_linear

CASES = [((4608, 4096), 32, (32, 64, 2, 4, 3, 1)), ((4608, 4096), 32, ("mma", 32, 64, 2, 4, 3, 1, 1)),
         ((27392, 4096), 1, (16, 8, 4, 1, 0, 1)), ((27392, 4096), 1, ("mma", 16, 64, 2, 4, 3, 1, 1))]

if __name__ == "__main__":
    torch.manual_seed(0)
    for (n, k), rows, cfg in CASES:
        p, s, m = quantize_w4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(2):
            try:
                w4_linear(x, p, s, m, config=cfg)
            except Exception as exc:  # report and go on: the other cases still run
                print(cfg, "failed:", type(exc).__name__, str(exc)[:200])
                break
        torch.cuda.synchronize()
        print(f"{n}x{k} rows {rows} {cfg} launched")

"""Wall-clock time of the command line as a user sees it: help, an argument error, and a repeated
``glmv ask --model tiny IMG -p ... --max-new-tokens 8`` with the model resident (``glmv start``) and without.

Every figure is a real process (``python -m glmv ...``, which imports the cached module as the console
script does), so it includes Python's start-up and the imports. The median of ``--runs`` runs is reported,
with the worst.
Usage: ``PYTHONPATH=src python scripts/bench_cli.py [--runs 5] [--json] [--json-out FILE]``.
It starts a resident tiny model when none is running and stops it again at the end (a resident model that
was already running is used and left running).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
IMAGE = str(REPO / "input" / "image_1.png")
ASK = ["ask", "--model", "tiny", IMAGE, "-p", "what is in this picture?", "--max-new-tokens", "8"]


def glmv(args: list[str], check: bool = True) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "glmv", *args], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "GLMV_HISTORY": "off"}, timeout=600)
    wall = time.perf_counter() - t0
    if check and p.returncode not in (0, 2):
        raise SystemExit(f"glmv {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return wall, p


def _cpu_s(pid: int | None) -> float:
    """CPU seconds used so far by process ``pid`` (Linux), or by this script's finished children (None)."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(args: list[str], runs: int, expect_in_stderr: str | None = None,
          server_pid: int | None = None) -> dict[str, Any]:
    """Wall time per run, and CPU time (the command's, and the resident server's): the CPU figures do not
    depend on what else the machine is doing, the wall figures do."""
    walls, cpu, server_cpu = [], [], []
    for _ in range(runs):
        c0, s0 = _cpu_s(None), _cpu_s(server_pid) if server_pid else 0.0
        wall, p = glmv(args)
        cpu.append(_cpu_s(None) - c0)
        if server_pid:
            server_cpu.append(_cpu_s(server_pid) - s0)
        if expect_in_stderr is not None and expect_in_stderr not in p.stderr:
            raise SystemExit(f"expected {expect_in_stderr!r} from glmv {' '.join(args)}; got:\n{p.stderr[-2000:]}")
        walls.append(wall)
    out = {"median_s": round(statistics.median(walls), 3), "max_s": round(max(walls), 3), "runs": runs,
           "walls_s": [round(w, 3) for w in walls], "cpu_s": round(statistics.median(cpu), 3)}
    if server_cpu:
        out["server_cpu_s"] = round(statistics.median(server_cpu), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    p.add_argument("--in-process-runs", type=int, default=1,
                   help="runs of the in-process ask (slow; default 1; 0 skips it)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the JSON object to FILE")
    args = p.parse_args(argv)

    report: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                              "python": platform.python_version(),
                              "date": time.strftime("%Y-%m-%d"), "load_avg_1min": round(os.getloadavg()[0], 2)}
    report["help"] = timed(["--help"], args.runs)
    report["argument_error"] = timed(["ask", "--temperature", "abc"], args.runs, "error: --temperature needs a number")
    report["missing_image"] = timed(["ask", "no-such.png"], args.runs, "no such file")

    _, ps = glmv(["ps", "--json"])
    already = any(s["model"] == "tiny" for s in json.loads(ps.stdout)["servers"])
    if not already:
        wall, started = glmv(["start", "--model", "tiny", "--idle-timeout", "10m"])
        if started.returncode != 0:
            raise SystemExit(started.stderr)
        report["start_s"] = round(wall, 3)
    _, ps = glmv(["ps", "--json"])
    pid = next(s["pid"] for s in json.loads(ps.stdout)["servers"] if s["model"] == "tiny")
    try:
        glmv(ASK)  # first request: warms the server's caches
        report["ask_resident"] = timed(ASK, args.runs, "using the resident tiny", server_pid=pid)
    finally:
        if not already:
            glmv(["stop", "--model", "tiny"])
    if args.in_process_runs:
        report["ask_in_process"] = timed([*ASK, "--no-server"], args.in_process_runs, "loading tiny")
    report["load_avg_1min_end"] = round(os.getloadavg()[0], 2)

    text = json.dumps(report)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n", encoding="utf-8")
    if args.json:
        print(text)
        return 0
    print(f"{report['machine']}, Python {report['python']}, load average {report['load_avg_1min']} at the start")
    print("| command | median wall | worst | runs | CPU: command + server |\n|---|---|---|---|---|")
    for key, label in (("help", "glmv --help"), ("argument_error", "glmv ask --temperature abc"),
                       ("missing_image", "glmv ask no-such.png"),
                       ("ask_resident", "glmv ask --model tiny IMG (resident)"),
                       ("ask_in_process", "glmv ask --model tiny IMG --no-server")):
        if key not in report:
            continue
        r = report[key]
        cpu = f"{r['cpu_s']:.2f} s" + (f" + {r['server_cpu_s']:.2f} s" if "server_cpu_s" in r else "")
        print(f"| `{label}` | {r['median_s']:.2f} s | {r['max_s']:.2f} s | {r['runs']} | {cpu} |")
    if "start_s" in report:
        print(f"glmv start --model tiny: {report['start_s']:.1f} s (once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

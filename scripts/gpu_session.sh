#!/usr/bin/env bash
# Run named GPU measurement steps one after another, each under its own time limit, logging to $OUT/<step>.log
# (the device tool brings $OUT back). Usage: scripts/gpu_session.sh check:130 serving:120 serve:150 w4:120 ttft:50
# Every step runs from the repository root with PYTHONPATH=src; a step that fails or times out does not stop the rest.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # packages the device image lacks (the server's and the openai client's), carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1 \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/summary.log"
for spec in "$@"; do
  step=${spec%%:*}; limit=${spec#*:}
  case $step in
    check) cmd=(python3 scripts/gpu_check.py) ;;
    serving) cmd=(python3 scripts/serving_check.py) ;;
    serve) cmd=(python3 -m glmv.bench --serve ${SERVE_ARGS:---rates 2,8 --requests 16 --users 8 --rounds 3} --json "$OUT/serve.json") ;;
    w4) cmd=(python3 scripts/w4_bench.py --rows "${W4_ROWS:-1,8,32}" --json "$OUT/w4.json") ;;
    ttft) cmd=(python3 scripts/ttft_probe.py) ;;
    bench) cmd=(python3 -m glmv.bench --configs "${BENCH_CONFIGS:-glmv-bf16,glmv-4bit}" --batches 1,8,32 --json-out "$OUT/bench.json") ;;
    *) echo "unknown step $step"; continue ;;
  esac
  t0=$(date +%s)
  timeout "$limit" "${cmd[@]}" >"$OUT/$step.log" 2>&1
  rc=$?
  echo "== $step rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.log"
done

#!/usr/bin/env bash
# Issue 7 GPU run 328 (session 46): one replay's timeline of SDXL b1 LoKr full-matrix (run 327: 103.74 ms against the
# floor's 58.15, 1.784×; 1.623× on the H100 in run 219) — which kernels take its time over the floor (the floor's
# trace at this code: run 309's).
#   OUT=$OUT bash benchmarks/run_lokrfull46b.sh      (carry .whl; ≈ 70 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
step_table t 60 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 10 --variants lyco --algos lokr-full \
  --jobs sdxl:1 --no-baselines --graph-trace lokr-full/lyco
gzip "$OUT"/t/graph_trace_*.json
step_records t
pack_out

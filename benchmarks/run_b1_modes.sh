#!/usr/bin/env bash
# Issue 7 GPU run 203 (session 27): SD1.5 b1 LoRA by the other per-layer forms — the rebuilt op on every layer
# (lyco-rebuild: merge + one GEMM forward, W′ rebuilt for ∂x), the delta path on layers with fewer rows than c × their
# outputs (LYCO_BYPASS_ROWS 1 and 4; 0 in captured steps by default) — against the default.
#   OUT=$OUT bash benchmarks/run_b1_modes.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --jobs sd15:1 --algos lora"
step_table base 400 --no-baselines --variants lyco,lyco-rebuild $A
(export LYCO_BYPASS_ROWS=1; step_table rows1 400 --no-baselines --variants lyco $A)
(export LYCO_BYPASS_ROWS=4; step_table rows4 400 --no-baselines --variants lyco $A)
step_table base2 420 --no-baselines --variants lyco $A
step_records base rows1 rows4 base2
pack_out

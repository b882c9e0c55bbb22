#!/usr/bin/env bash
# Issue 7 GPU run 168 (session 22): what runs 166–167 did not reach at SD1.5 b1 with changes 109–110 — GLoRA (through
# the bypass op) and (IA)³ at change 108's default input threshold — the floor alongside.
#   OUT=$OUT bash benchmarks/run_b1_rest.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
step_table s1 150 --jobs sd15:1 --algos glora,ia3 --baselines floor --rounds 1 --steps 2 --warmup 1 --graph \
  --graph-steps 15 --variants lyco
pack_out

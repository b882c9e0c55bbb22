#!/usr/bin/env bash
# Issue 7 GPU run 202 (session 27): change 120 for output-mode (IA)³ (its output-keeping op on ff.net.2 takes the
# GEGLU's backward, no ∂D) — SD1.5 b8 with the floor and PEFT, SDXL b4 with PEFT; LYCO_GEGLU_FUSE=0 for each.
#   OUT=$OUT bash benchmarks/run_geglu_ia3.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 100 ia3
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 520 --jobs sd15:8 --algos ia3 --baselines floor --variants lyco,peft $A
(export LYCO_GEGLU_FUSE=0; step_table s8_off 520 --jobs sd15:8 --algos ia3 --no-baselines --variants lyco $A)
step_table x4 520 --jobs sdxl:4 --algos ia3 --no-baselines --variants lyco,peft $A
(export LYCO_GEGLU_FUSE=0; step_table x4_off 540 --jobs sdxl:4 --algos ia3 --no-baselines --variants lyco $A)
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records s8 s8_off x4 x4_off
pack_out

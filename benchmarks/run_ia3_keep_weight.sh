#!/usr/bin/env bash
# Issue 7 GPU run 209 (session 28): (IA)³ at SD1.5 b8 after change 121 — W′ kept from the forward for the backward's
# ∂x up to LYCO_IA3_KEEP_WEIGHT_MAX elements (0 = as now, 2²¹, all) and every linear layer keeping its output
# (LYCO_IA3_KEEP_OUTPUT_MIN_IN=0; with change 121 a GEGLU projection under the line takes its sums either way), with
# PEFT and floor-geglu; the trainer's graphs against eager (ia3, the new switch at 2²¹).
#   OUT=$OUT bash benchmarks/run_ia3_keep_weight.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
(export LYCO_IA3_KEEP_WEIGHT_MAX=2097152; graph_check 80 ia3)
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --algos ia3 --jobs sd15:8"
step_table base 260 --baselines floor-geglu --variants lyco,peft $A
(export LYCO_IA3_KEEP_WEIGHT_MAX=2097152; step_table kw2m 300 --no-baselines --variants lyco $A)
(export LYCO_IA3_KEEP_WEIGHT_MAX=1000000000; step_table kwall 340 --no-baselines --variants lyco $A)
(export LYCO_IA3_KEEP_OUTPUT_MIN_IN=0; step_table min0 380 --no-baselines --variants lyco $A)
(export LYCO_IA3_KEEP_OUTPUT_MIN_IN=0 LYCO_IA3_KEEP_WEIGHT_MAX=2097152; step_table min0kw2m 420 --no-baselines --variants lyco $A)
step_table base2 460 --no-baselines --variants lyco $A
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records base kw2m kwall min0 min0kw2m base2
pack_out

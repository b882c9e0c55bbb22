#!/usr/bin/env bash
# Issue 7 GPU run 211 (session 28): (IA)³ at SD1.5 b8 with change 123 (the transformers' 1×1 proj_in/proj_out keeping
# their output, ∂w from ∂y and y: ia3._KeepOutputConv) — against LYCO_IA3_KEEP_OUTPUT_CONV=0, with PEFT and
# floor-geglu; W′ kept up to 2²⁰ elements; the benchmark's float64 gradient check with every path at 1; the trainer's
# graphs against eager (ia3).
#   OUT=$OUT bash benchmarks/run_ia3_conv.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 80 ia3
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --algos ia3 --jobs sd15:8"
step_table base 260 --baselines floor-geglu --variants lyco,peft $A
(export LYCO_IA3_KEEP_OUTPUT_CONV=0; step_table convoff 300 --no-baselines --variants lyco $A)
(export LYCO_IA3_KEEP_WEIGHT_MAX=1048576; step_table kw1m 340 --no-baselines --variants lyco $A)
(export LYCO_IA3_KEEP_OUTPUT=1 LYCO_GEGLU_FUSE=1 LYCO_IA3_GEGLU_SUMS=1 LYCO_IA3_ROWS_KERNEL=1 LYCO_IA3_KEEP_OUTPUT_CONV=1
 step_table all1 380 --no-baselines --variants lyco $A)
step_table base2 420 --no-baselines --variants lyco,peft $A
grep -h "check" $OUT/base/train_step.log $OUT/all1/train_step.log | grep -o "check.*" | cut -c1-200
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records base convoff kw1m all1 base2
pack_out

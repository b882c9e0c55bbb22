#!/usr/bin/env bash
# Issue 7 GPU run 210 (session 28): (IA)³ at SD1.5 b8 with change 122 (the backward's W′ built by the channel
# gradient's last launch) — with PEFT and floor-geglu; W′ kept from the forward up to 2²⁰ elements and for every
# layer (LYCO_IA3_KEEP_WEIGHT_MAX); the trainer's graphs against eager (ia3).
#   OUT=$OUT bash benchmarks/run_ia3_merged.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 80 ia3
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --algos ia3 --jobs sd15:8"
step_table base 260 --baselines floor-geglu --variants lyco,peft $A
(export LYCO_IA3_KEEP_WEIGHT_MAX=1048576; step_table kw1m 300 --no-baselines --variants lyco $A)
(export LYCO_IA3_KEEP_WEIGHT_MAX=1000000000; step_table kwall 340 --no-baselines --variants lyco $A)
step_table base2 380 --no-baselines --variants lyco,peft $A
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records base kw1m kwall base2
pack_out

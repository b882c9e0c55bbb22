#!/usr/bin/env bash
# Issue 7 GPU run 240 (session 32): an op's backward leaving its side streams unjoined where nothing it returns comes
# from them (change 135, LYCO_LATE_JOIN, lowrank._late_join) — A/B/A at SD1.5 b1 LoRA beside PEFT and the floor, A/B
# at SD1.5 b8, SDXL b1 and SD1.5 b1 LoCon with it; the trainer's graphs against eager with it on.
#   OUT=$OUT bash benchmarks/run_late_join.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
J="--jobs sd15:1 --algos lora $A"
step_table on 100 --baselines floor --variants lyco,peft $J
(export LYCO_LATE_JOIN=0; step_table off 130 --no-baselines --variants lyco $J)
step_table on2 160 --no-baselines --variants lyco $J
step_table s8 195 --no-baselines --variants lyco --jobs sd15:8 --algos lora $A
(export LYCO_LATE_JOIN=0; step_table s8off 230 --no-baselines --variants lyco --jobs sd15:8 --algos lora $A)
step_table x1 275 --no-baselines --variants lyco --jobs sdxl:1 --algos lora $A
step_table c1 305 --no-baselines --variants lyco --jobs sd15:1 --algos locon $A
graph_check 100 lora,locon,loha
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2 s8 s8off x1 c1
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 229 (session 30): run 228's SD1.5 b8 LoRA leg again with PEFT in the same run (run 228's deadline
# left PEFT out); the floor beside it.
#   OUT=$OUT bash benchmarks/run_thin_margins2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 250 --baselines floor --variants lyco,peft --jobs sd15:8 --algos lora $A
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records s8
grep -E 'floor' $OUT/s8/train_step.log | head -3
pack_out

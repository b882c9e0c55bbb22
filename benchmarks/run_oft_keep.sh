#!/usr/bin/env bash
# Issue 7 GPU run 216 (session 29): Diag-OFT keeping its output (oft._RotateKeepOutput) at SDXL b4 — on (eager and
# graph, so the script's gradient check covers it), off (the rebuilt op), PEFT's OFT; SD1.5 b1 LoRA and LoCon with
# the one-sample factor gradients (lowrank._bmm_sum) beside PEFT and the floor.
#   OUT=$OUT bash benchmarks/run_oft_keep.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
(export LYCO_OFT_KEEP_OUTPUT=1; step_table x4 60 --no-baselines --variants lyco --jobs sdxl:4 --algos oft $A)
(export LYCO_OFT_KEEP_OUTPUT=0; step_table x4off 200 --no-baselines --variants lyco --jobs sdxl:4 --algos oft $A)
step_table x4peft 320 --no-baselines --variants peft --jobs sdxl:4 --algos oft $A
step_table b1 440 --baselines floor --variants lyco,peft --jobs sd15:1 --algos lora,locon $A
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
grep -h "RuntimeWarning: lyco" $OUT/*/train_step.log | sort | uniq -c | head
step_records x4 x4off x4peft b1
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 259 (session 35): SD1.5 b1 after changes 145–148 (the 1×1 delta-path up without a batch sum for one
# sample, change 148) — floor, LoKr, LoCon; the trainer's graphs against eager for locon and lokr; LoRA (≈ 3.5 min).
#   OUT=$OUT bash benchmarks/run_final35.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
step_table t 125 $A --baselines floor --algos lokr,locon
graph_check 60 locon,lokr
step_table lora 230 $A --no-baselines --algos lora
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records t lora
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 228 (session 30): the goal cells met by the thinnest margins, re-measured at this session's code
# beside the peer in the same run — LoRA at SD1.5 b8 (0.792× PEFT in run 197) and SDXL b1 (0.790× in run 198).
# Run 228 ran it with deadlines 100 and 260, which left SD1.5 b8's PEFT leg out (run 229 measured it); raised since.
#   OUT=$OUT bash benchmarks/run_thin_margins.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 200 --no-baselines --variants lyco,peft --jobs sd15:8 --algos lora $A
step_table x1 320 --no-baselines --variants lyco,peft --jobs sdxl:1 --algos lora $A
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records s8 x1
pack_out

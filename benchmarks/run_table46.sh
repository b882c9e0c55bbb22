#!/usr/bin/env bash
# Issue 7 GPU run 324 (session 46): where the batch-1 goals stand at this session's code, in one run — SD1.5 b1 and
# SDXL b1, LoRA / LoCon / LoHa / LoKr, lyco and PEFT 0.21.2 with the floor (the README's goal table; run 323 measured
# change 172's 16384-element tile in SDXL b1 LoKr's step).
#   OUT=$OUT bash benchmarks/run_table46.sh      (carry .whl; ≈ 560 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco,peft --algos lora,locon,loha,lokr"
step_table s 190 $A --jobs sd15:1 --baselines floor
step_table x 500 $A --jobs sdxl:1 --baselines floor
grep "÷best peer" "$OUT"/s/train_step.log "$OUT"/x/train_step.log | grep graph | cut -c1-200
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records s x
pack_out

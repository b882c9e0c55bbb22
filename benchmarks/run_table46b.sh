#!/usr/bin/env bash
# Issue 7 GPU run 326 (session 46): the larger sizes of the goal table at this session's code, in one run — SD1.5 b8
# (LoRA / LoCon / LoHa / LoKr) and SDXL b4 (LoRA / LoKr / LoHa / LoCon, as far as the deadline allows), lyco and
# PEFT 0.21.2 with the floor (run 324 did batch 1).
#   OUT=$OUT bash benchmarks/run_table46b.sh      (carry .whl; ≈ 540 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco,peft"
step_table s8 190 $A --jobs sd15:8 --algos lora,locon,loha,lokr --baselines floor
step_table x4 460 $A --jobs sdxl:4 --algos lora,lokr,loha,locon --baselines floor
grep "÷best peer" "$OUT"/s8/train_step.log "$OUT"/x4/train_step.log | grep graph | cut -c1-200
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records s8 x4
pack_out

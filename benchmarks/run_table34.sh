#!/usr/bin/env bash
# Issue 7 GPU run 250 (session 34): SD1.5 b1 at this session's code — LoRA, LoCon, LoHa, LoKr against PEFT and the
# floor in one run (the closing note's ratios: change 141, LoHa's delta-path convs' ∂D by the batched GEMM; change 143,
# LoKr's weight-gradient sums, scale and casts in one launch); the trainer's graphs against eager for lokr (≈ 6 min).
#   OUT=$OUT bash benchmarks/run_table34.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
step_table t 300 --baselines floor --variants lyco,peft --jobs sd15:1 --algos lora,locon,loha,lokr \
  --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15
grep "÷best peer" "$OUT/t/train_step.log" | grep graph | cut -c1-160
graph_check 70 lokr
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records t
pack_out

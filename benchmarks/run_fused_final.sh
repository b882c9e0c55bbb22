#!/usr/bin/env bash
# (The 1×1 conv path measured here was taken out after run 135 — no gain in the step; NOTES change 92, kept as
# benchmarks/experiments/fused_conv1x1.patch: LYCO_FUSED_CONV no longer exists.)
# Issue 7 GPU run 135 (NOTES changes 91–92): the README's LoRA and LoCon rows with PEFT in the same run (SD1.5 b8 as
# graphs, the floor alongside), then A/B/A of LYCO_FUSED_CONV on LoRA (the 1×1 conv path now only at ≥ 16384
# positions, 128-channel tiles), the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_fused_final.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
step_table table 150 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 \
  --algos lora,locon --variants lyco,peft --baselines floor
aba LYCO_FUSED_CONV 260 330 400 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 \
  --algos lora --variants lyco
graph_check 90 lora,lora-fp16
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 139 (NOTES change 95): the backward's ∂U on a second side stream beside the ∂h → ∂D chain
# (LYCO_SIDE_SPLIT, captured steps by default). SD1.5 b8 as graphs, A/B/A against LYCO_SIDE_SPLIT=0 (LoRA, LoCon,
# LoHa; the floor alongside), then the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_side_split.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
aba LYCO_SIDE_SPLIT 120 200 280 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 \
  --algos lora,locon,loha --variants lyco
graph_check 120 lora,lora-te,lora-ckpt,locon
pack_out

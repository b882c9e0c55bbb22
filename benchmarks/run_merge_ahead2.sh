#!/usr/bin/env bash
# Issue 7 GPU run 140 (NOTES change 96): each op's ∂x weight W + s·U·D built ahead by the next op's backward on the
# up stream (LYCO_MERGE_AHEAD, captured steps by default; change 69 built them on the side stream and lost). SD1.5 b8
# as graphs, A/B/A against LYCO_MERGE_AHEAD=0 (LoRA, LoCon, LoHa, LoKr; the floor alongside), then the trainer's
# graphs against eager.
#   OUT=$OUT bash benchmarks/run_merge_ahead2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
aba LYCO_MERGE_AHEAD 130 220 310 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 \
  --algos lora,locon,loha,lokr --variants lyco
graph_check 120 lora,lora-te,lora-ckpt,locon,lokr
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 123 (NOTES change 84): under autocast one cast of an input several op layers share (q, k, v of a
# LayerNorm's fp32 output) and a linear layer's ∂x in that fp32 from its GEMM. The op's numbers on the GPU against
# float64 first (benchmarks/experiments/op_fp32_grads.py); then the real trainer (SD1.5-sized, graph): LoRA with
# autocast at this code / at change 83 (.ab_mid) / this code again (profiled); LoHa and LoKr with autocast at
# this code and at the session's start (.ab_old, before change 83); last the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_trainer_casts2.sh      (carry .whl, .ab_mid and .ab_old)
. benchmarks/_gpu_lib.sh
trainer_env
op_check 120 "fp32-in|worst"
trainer_row new-lora-ac 150 benchmarks/train_graph.py --models sd15 --warmup 5 --steps 20 --algos lora
trainer_row mid-lora-ac 150 .ab_mid/benchmarks/train_graph.py --models sd15 --warmup 5 --steps 20 --algos lora
trainer_row new2-lora-ac 150 benchmarks/train_graph.py --models sd15 --warmup 5 --steps 20 --algos lora --profile 2
trainer_row new-loha-lokr-ac 150 benchmarks/train_graph.py --models sd15 --warmup 5 --steps 20 --algos loha,lokr
trainer_row old-loha-lokr-ac 150 .ab_old/benchmarks/train_graph.py --models sd15 --warmup 5 --steps 20 --algos loha,lokr
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 80 lora,loha
pack_out

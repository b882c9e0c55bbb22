#!/usr/bin/env bash
# Issue 7 GPU run 124 (NOTES change 85): the op adds a linear layer's factor gradients into the parameters' existing
# gradients by their GEMMs (lowrank.step_casts(grad_sink=True), the trainer with one process) — autograd's per-
# parameter adds gone. The op's numbers on the GPU against float64 first (op_fp32_grads.py, its "sink" rows); then
# the real trainer (SD1.5-sized LoRA, graph) with autocast at this code / at change 84 (.ab_mid) / this code again,
# and without autocast both ways; last the trainer's graphs against eager in 8 cases (accumulation, fp16, ckpt, TE).
#   OUT=$OUT bash benchmarks/run_trainer_sink.sh      (carry .whl and .ab_mid)
. benchmarks/_gpu_lib.sh
trainer_env
op_check 150 "sink|worst"
trainer_row new-ac 150 benchmarks/train_graph.py --models sd15 --algos lora --warmup 5 --steps 20
trainer_row mid-ac 150 .ab_mid/benchmarks/train_graph.py --models sd15 --algos lora --warmup 5 --steps 20
trainer_row new2-ac 150 benchmarks/train_graph.py --models sd15 --algos lora --warmup 5 --steps 20
trainer_row new-noac 150 benchmarks/train_graph.py --models sd15 --algos lora --warmup 5 --steps 20 --no-autocast
trainer_row mid-noac 150 .ab_mid/benchmarks/train_graph.py --models sd15 --algos lora --warmup 5 --steps 20 --no-autocast
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 150 lora,lora-accum2,lora-fp16,lora-ckpt,locon,loha,lora-te,lora-rebuild
pack_out

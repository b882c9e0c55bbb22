#!/usr/bin/env bash
# Issue 7 GPU run 125 (NOTES changes 83-85 at SDXL size): the op's numbers on the GPU against float64 with the sink's
# engagement counted (op_fp32_grads.py); the SD1.5-sized LoRA trainer step once more (the sink asked of autograd's
# engine per call now); the SDXL-sized trainer (1024 px, batch 4, LoRA r16, both text encoders) with autocast at this
# code and at the session's start (.ab_old, before change 83), and without autocast; the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_trainer_final.sh      (carry .whl and .ab_old)
. benchmarks/_gpu_lib.sh
trainer_env
op_check 150 "sink|worst"
trainer_row sd15-ac 150 benchmarks/train_graph.py --algos lora --models sd15 --warmup 5 --steps 20
trainer_row sdxl-ac 150 benchmarks/train_graph.py --algos lora --models sdxl --warmup 4 --steps 12
trainer_row sdxl-old-ac 150 .ab_old/benchmarks/train_graph.py --algos lora --models sdxl --warmup 4 --steps 12
trainer_row sdxl-noac 150 benchmarks/train_graph.py --algos lora --models sdxl --warmup 4 --steps 12 --no-autocast
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 80 lora,lora-accum2,lora-te
pack_out

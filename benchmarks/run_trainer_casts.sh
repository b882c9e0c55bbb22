#!/usr/bin/env bash
# Issue 7 GPU run 122 (NOTES change 83): the trainer's fp32 adapter cast once per step and flat buffer
# (lowrank.step_casts), the ops' factors kept cast for their backward, the factors' gradients in fp32 from their
# GEMMs. First the op's numbers on the GPU against float64 (benchmarks/experiments/op_fp32_grads.py), then the real
# trainer (SD1.5-sized LoRA, graph) with autocast and without, new / old (HEAD's src before the change, carried as
# .ab_old) / new again with a profile; last the trainer's graphs against eager on the tiny model.
#   OUT=$OUT bash benchmarks/run_trainer_casts.sh      (carry .whl and .ab_old)
. benchmarks/_gpu_lib.sh
trainer_env
op_check 120 "."
trainer_row new-ac 170 benchmarks/train_graph.py --models sd15 --algos lora --warmup 5 --steps 20
trainer_row new-noac 170 benchmarks/train_graph.py --models sd15 --algos lora --warmup 5 --steps 20 --no-autocast
trainer_row old-ac 170 .ab_old/benchmarks/train_graph.py --models sd15 --algos lora --warmup 5 --steps 20
trainer_row old-noac 170 .ab_old/benchmarks/train_graph.py --models sd15 --algos lora --warmup 5 --steps 20 --no-autocast
trainer_row new2-noac 170 benchmarks/train_graph.py --models sd15 --algos lora --warmup 5 --steps 20 --no-autocast --profile 2
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 110 lora,locon,loha
pack_out

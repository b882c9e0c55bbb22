#!/usr/bin/env bash
# Issue 7 GPU run 126 (NOTES change 86): DoRA's and GLoRA's builds inside the rebuilt op take their fp32 factors from
# the storage's one cast per step (casts.cast_factor). The real trainer (SD1.5-sized, autocast, graph) with DoRA r16
# and GLoRA r8, this code against the code before (.ab_mid), then the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_trainer_dora.sh      (carry .whl and .ab_mid)
. benchmarks/_gpu_lib.sh
trainer_env
trainer_row new-dora 75 benchmarks/train_graph.py --models sd15 --algos dora --warmup 4 --steps 12
trainer_row old-dora 75 .ab_mid/benchmarks/train_graph.py --models sd15 --algos dora --warmup 4 --steps 12
trainer_row new-glora 75 benchmarks/train_graph.py --models sd15 --algos glora --warmup 4 --steps 12
trainer_row old-glora 75 .ab_mid/benchmarks/train_graph.py --models sd15 --algos glora --warmup 4 --steps 12
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 40 dora,glora
pack_out

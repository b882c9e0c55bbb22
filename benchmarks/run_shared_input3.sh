#!/usr/bin/env bash
# Issue 7 GPU run 129 (NOTES change 89): run 128 had LoKr at 86.10 ms (84.95 in run 113) — the group asked every
# member for its bypass factors before knowing whether the group forms, and LoKr's (a grouped down: never in a group)
# were built through its per-pass factor batch and thrown away. Now the members are checked first (no factor built
# for a layer that does not join). A/B/A of LYCO_SHARED_INPUT on LoKr, LoHa, LoRA (graph, the floor alongside), then
# the trainer's graphs against eager for LoKr and LoHa.
#   OUT=$OUT bash benchmarks/run_shared_input3.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
aba LYCO_SHARED_INPUT 110 170 230 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 \
  --algos lokr,loha,lora --variants lyco
graph_check 150 lokr,lokr-lowrank,loha,locon
pack_out

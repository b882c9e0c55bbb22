#!/usr/bin/env bash
# Issue 7 GPU run 105 (review): the Khatri-Rao kernels' member offsets through one Triton helper returning the moved
# pointers (factor_triton._kr_member) — SD1.5 b8 LoHa as a graph (the batched kernels, checked against the
# reference before timing) and the trainer's graphs against eager for loha.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_kr_member.sh
. benchmarks/_gpu_lib.sh
step_table on 90 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 \
  --variants lyco --algos loha --baselines floor
graph_check 100 loha,loha-rebuild

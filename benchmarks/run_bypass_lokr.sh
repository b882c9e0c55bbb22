#!/usr/bin/env bash
# Issue 7 GPU run 68: LoKr's low-rank W2 on linear layers through the bypass op (factors kron(I, B), kron(W1, A);
# lyco/algorithms/lokr.py lowrank_factors): the trainer's CUDA graphs against eager with the op in both, then
# SD1.5 b8 LoKr (factor 8, rank 16 on lin+conv) with and without the op (LYCO_BYPASS_OP=0), A/B/A, PEFT alongside.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_bypass_lokr.sh
. benchmarks/_gpu_lib.sh
graph_check 110 lokr,lokr-lowrank,lokr-lowrank-ckpt
ARGS="--models sd15 --batches 8 --algos lokr --rounds 1 --steps 8 --warmup 2 --graph --graph-steps 30"
step_table op 250 $ARGS --variants lyco,peft --baselines floor
(export LYCO_BYPASS_OP=0; step_table off 330 $ARGS --variants lyco --no-baselines)
step_table op2 400 $ARGS --variants lyco --no-baselines

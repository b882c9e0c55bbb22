#!/usr/bin/env bash
# Issue 7 GPU run 104: LoKr's op layers (grouped down, D = kron(I, B)) with the merged weight by the Triton pass too
# (NOTES change 74): SD1.5 b8 LoKr as a graph, A/B/A against LYCO_MERGE_KERNEL=0; trainer graphs vs eager for LoKr.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_lokr_merge.sh
. benchmarks/_gpu_lib.sh
ARGS="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr"
step_table on 80 $ARGS --baselines floor
(export LYCO_MERGE_KERNEL=0; step_table off 130 $ARGS --no-baselines)
step_table on2 180 $ARGS --no-baselines
graph_check 150 lokr,lokr-lowrank,lokr-fp16,lokr-lowrank-ckpt

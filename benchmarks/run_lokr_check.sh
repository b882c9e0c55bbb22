#!/usr/bin/env bash
# Issue 7 GPU run 89: LoKr's weight-gradient rule moved into the bypass op's steps (LoKr.prefers_rebuild_in_op:
# captured steps by default, eager steps keep the delta path): SD1.5 b8 eager and as a CUDA graph, rule on/off,
# and the trainer's graphs against eager.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_lokr_check.sh
. benchmarks/_gpu_lib.sh
ARGS="--models sd15 --batches 8 --rounds 1 --steps 6 --warmup 2 --graph --graph-steps 20 --variants lyco"
step_table on 150 $ARGS --algos lokr --baselines floor
(export LYCO_LOKR_WGRAD_PER_H=0; step_table off 210 $ARGS --algos lokr --no-baselines)
step_table on2 270 $ARGS --algos lokr --no-baselines
graph_check 100 lokr-lowrank

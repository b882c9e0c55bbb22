#!/usr/bin/env bash
# Issue 7 GPU run 85: LoKr's low-rank W2 on the rebuilt op where the layer is narrow (LoKr._weight_grad_pays, from
# runs 83-84's per-layer table), the rest on the op/delta path: the SD1.5 b8 step as a CUDA graph, A/B/A against
# the rule off (LYCO_LOKR_WGRAD_PER_H=0), and the trainer's graphs against eager for LoKr (low-rank, with
# checkpointing) on the new mix of paths.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_lokr_rule.sh
. benchmarks/_gpu_lib.sh
ARGS="--models sd15 --batches 8 --rounds 1 --steps 4 --warmup 2 --graph --graph-steps 20 --variants lyco"
step_table rule 170 $ARGS --algos lokr --baselines floor
(export LYCO_LOKR_WGRAD_PER_H=0; step_table off 240 $ARGS --algos lokr --no-baselines)
step_table rule2 300 $ARGS --algos lokr --no-baselines
graph_check 120 lokr-lowrank,lokr-lowrank-ckpt

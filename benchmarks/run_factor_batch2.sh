#!/usr/bin/env bash
# Issue 7 GPU run 92: factor_batch for LoHa's Khatri-Rao pair too (batched Triton launches, one per shape each
# way), and the generalised batch for LoKr: SD1.5 b8 as a CUDA graph, A/B/A against LYCO_FACTOR_BATCH=0; the
# trainer's graphs against eager for loha, lokr, lokr-lowrank.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_factor_batch2.sh
. benchmarks/_gpu_lib.sh
ARGS="--models sd15 --batches 8 --rounds 1 --steps 4 --warmup 2 --graph --graph-steps 20 --variants lyco"
step_table on 120 $ARGS --algos lokr,loha --baselines floor
(export LYCO_FACTOR_BATCH=0; step_table off 180 $ARGS --algos lokr,loha --no-baselines)
step_table on2 240 $ARGS --algos lokr,loha --no-baselines
graph_check 100 loha,lokr,lokr-lowrank

#!/usr/bin/env bash
# Issue 7 GPU run 90: LoKr's up built once per pass for all layers of a shape (algorithms/factor_batch.py: one
# stacked build and one stacked backward per shape instead of two launches per layer) — SD1.5 b8 as a CUDA graph,
# A/B/A against LYCO_FACTOR_BATCH=0, PEFT's LoKr in the same run; the trainer's graphs against eager; SDXL b4.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_factor_batch.sh
. benchmarks/_gpu_lib.sh
ARGS="--models sd15 --batches 8 --rounds 1 --steps 6 --warmup 2 --graph --graph-steps 20"
step_table on 150 $ARGS --algos lokr --variants lyco,peft --baselines floor
(export LYCO_FACTOR_BATCH=0; step_table off 210 $ARGS --algos lokr --variants lyco --no-baselines)
step_table on2 270 $ARGS --algos lokr --variants lyco --no-baselines
graph_check 110 lokr-lowrank,lokr
step_table sdxl 470 --models sdxl --batches 4 --rounds 1 --steps 4 --warmup 2 --graph --graph-steps 20 \
  --algos lokr --variants lyco --baselines floor

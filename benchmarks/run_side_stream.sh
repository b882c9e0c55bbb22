#!/usr/bin/env bash
# Issue 7 GPU run 93 (the first form: every forward h on the side stream; run 96 measures the kept one): the bypass op's adapter products (forward h; backward ∂U, ∂h, ∂D) on a side stream while
# the frozen layer's GEMM/conv runs (LYCO_BYPASS_STREAMS, captured steps by default): SD1.5 b8 as a CUDA graph,
# A/B/A against LYCO_BYPASS_STREAMS=0; the trainer's graphs against eager for lora, locon, loha, lokr.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_side_stream.sh
. benchmarks/_gpu_lib.sh
ARGS="--models sd15 --batches 8 --rounds 1 --steps 4 --warmup 2 --graph --graph-steps 20 --variants lyco"
step_table on 150 $ARGS --algos lora,locon,loha,lokr --baselines floor
(export LYCO_BYPASS_STREAMS=0; step_table off 250 $ARGS --algos lora,locon,loha,lokr --no-baselines)
step_table on2 350 $ARGS --algos lora,locon,loha,lokr --no-baselines
graph_check 120 lora,locon,loha,lokr

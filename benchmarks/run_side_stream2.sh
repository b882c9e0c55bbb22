#!/usr/bin/env bash
# Issue 7 GPU runs 95-96 (the side stream of the bypass op, NOTES change 67). Run 95 compared which forward
# products pay on the side stream with an experiment's switch since removed (all / conv / lin / none; results in
# results/run95_h100_side_stream_fwd/). Run 96, this script: the kept form (backward's adapter products on the side
# stream, the forward's only for conv adapters) A/B/A against LYCO_BYPASS_STREAMS=0, SD1.5 b8 graphs; the trainer's
# graphs against eager for the cases that take the op.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_side_stream2.sh
. benchmarks/_gpu_lib.sh
ARGS="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
step_table on 110 $ARGS --algos lora,locon,loha,lokr --baselines floor
(export LYCO_BYPASS_STREAMS=0; step_table off 200 $ARGS --algos lora,locon,loha,lokr --no-baselines)
step_table on2 290 $ARGS --algos lora,locon,loha,lokr --no-baselines
graph_check 200 lora,locon,loha,lokr,lora-ckpt,lora-fp16,lokr-lowrank,lokr-lowrank-ckpt,locon-rebuild,loha-rebuild

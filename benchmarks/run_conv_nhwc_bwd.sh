#!/usr/bin/env bash
# Issue 7 GPU run 108 (NOTES change 76; LYCO_CONV_NHWC_BWD and its code were taken out after this run): a k×k conv's input gradient channels-last too (LYCO_CONV_NHWC_BWD: ∂y in and
# ∂x out by the tiled Triton copy instead of cuDNN's conversions), A/B/A, and the table's four low-rank rows with PEFT
# alongside (the goals are ratios within one run); the trainer's graphs against eager.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_conv_nhwc_bwd.sh
. benchmarks/_gpu_lib.sh
ARGS="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --algos lora,locon,loha,lokr"
step_table on 200 $ARGS --variants lyco,peft --baselines floor
(export LYCO_CONV_NHWC_BWD=0; step_table fwdonly 270 $ARGS --variants lyco --no-baselines)
step_table on2 340 $ARGS --variants lyco --no-baselines
graph_check 150 lora,locon,loha,lokr,lokr-lowrank,lora-fp16,locon-rebuild,lora-ckpt
pack_out

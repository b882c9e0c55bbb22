#!/usr/bin/env bash
# Issue 7 GPU run 157: a k×k conv's ∂x on its merged weight made channels-last by the tiled copy where the op builds
# it (ahead, on the up stream) instead of inside cuDNN's dgrad (lowrank._dgrad_cl, LYCO_DGRAD_WEIGHT_CL; where
# positions ≤ in·∏k). Run 150's profile of SD1.5's 8×8 conv on the op: cuDNN's NCHW→NHWC conversions 93 µs, mostly
# the 14.7 M-element W′. SD1.5 b8 as graphs, A/B/A; the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_dgrad_cl.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
aba LYCO_DGRAD_WEIGHT_CL 110 190 270 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph \
  --graph-steps 20 --algos locon,loha,lokr,lokr-full --variants lyco
graph_check 100 locon,lokr-full,loha
pack_out

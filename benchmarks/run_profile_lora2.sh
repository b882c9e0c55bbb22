#!/usr/bin/env bash
# Issue 7 GPU run 159 (session 21): where LoRA's step time over the floor goes at session 20's code — eager steps with
# every captured-steps path forced on (the kernels a captured step runs), the floor alongside, top 250 kernels of each;
# then the graph column of both for reference.
#   OUT=$OUT bash benchmarks/run_profile_lora2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
(for v in LYCO_FACTOR_KERNELS LYCO_BYPASS_OP LYCO_BYPASS_STREAMS LYCO_SIDE_SPLIT LYCO_MERGE_AHEAD LYCO_MERGE_KERNEL \
          LYCO_CONV_EPILOGUE LYCO_CONV_NHWC LYCO_CONV_WEIGHT_CL LYCO_DGRAD_WEIGHT_CL LYCO_TAPS_DOWN LYCO_SHARED_INPUT \
          LYCO_FUSED_GEMM; do export $v=1; done
 step_table prof 200 --models sd15 --batches 8 --algos lora --variants lyco --baselines floor --rounds 1 \
   --steps 4 --warmup 2 --profile floor,lora/lyco --profile-top 250)
step_table graph 330 --models sd15 --batches 8 --algos lora --variants lyco --baselines floor --rounds 1 \
   --steps 3 --warmup 2 --graph --graph-steps 20
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 130 (after NOTES change 89): where LoRA's step time over the floor goes now — eager steps with every
# captured-steps path forced on (the kernels a captured step runs), floor alongside, top 150 kernels of each.
#   OUT=$OUT bash benchmarks/run_profile_lora.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
(export LYCO_BYPASS_OP=1 LYCO_FACTOR_KERNELS=1 LYCO_BYPASS_STREAMS=1 LYCO_MERGE_KERNEL=1 LYCO_CONV_EPILOGUE=1 \
   LYCO_CONV_NHWC=1 LYCO_SHARED_INPUT=1
 step_table prof 150 --models sd15 --batches 8 --algos lora --variants lyco --baselines floor --rounds 1 \
   --steps 4 --warmup 2 --profile floor,lora/lyco --profile-top 150)
pack_out

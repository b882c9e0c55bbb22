#!/usr/bin/env bash
# Issue 7 GPU run 141 (after NOTES changes 95–96): the README's LoRA and LoCon rows with PEFT in the same run (SD1.5
# b8 as graphs, the floor alongside); then where LoCon's step goes over LoRA's — eager steps with every
# captured-steps path forced on (the kernels a captured step runs), floor, LoRA and LoCon, top 200 kernels of each.
#   OUT=$OUT bash benchmarks/run_table_locon_profile.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
step_table table 150 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 \
  --algos lora,locon --variants lyco,peft --baselines floor
(export LYCO_BYPASS_OP=1 LYCO_FACTOR_KERNELS=1 LYCO_BYPASS_STREAMS=1 LYCO_SIDE_SPLIT=1 LYCO_MERGE_AHEAD=1 \
   LYCO_MERGE_KERNEL=1 LYCO_CONV_EPILOGUE=1 LYCO_CONV_NHWC=1 LYCO_SHARED_INPUT=1 LYCO_FUSED_GEMM=1
 step_table prof 300 --models sd15 --batches 8 --algos lora,locon --variants lyco --baselines floor --rounds 1 \
   --steps 4 --warmup 2 --profile floor,lora/lyco,locon/lyco --profile-top 200)
pack_out

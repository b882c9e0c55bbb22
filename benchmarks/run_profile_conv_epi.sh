#!/usr/bin/env bash
# Issue 7 GPU run 109 (after NOTES change 75): (1) where LoRA's and LoCon's step time goes now — eager steps with every
# captured-steps path forced on (the kernels a captured step runs; run 71 showed their sum equals the graph's time),
# floor alongside, top 70 kernels; (2) SDXL b4 1024 px as graphs, LoCon/LoHa (SDXL's LoRA set has no conv), with the conv epilogue on and off.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_profile_conv_epi.sh
. benchmarks/_gpu_lib.sh
(export LYCO_BYPASS_OP=1 LYCO_FACTOR_KERNELS=1 LYCO_BYPASS_STREAMS=1 LYCO_MERGE_KERNEL=1 LYCO_CONV_EPILOGUE=1 \
   LYCO_CONV_NHWC=1
 step_table prof 150 --models sd15 --batches 8 --algos lora,locon --variants lyco --baselines floor --rounds 1 \
   --steps 4 --warmup 2 --profile floor,lora/lyco,locon/lyco --profile-top 70)
ARGS="--models sdxl --batches 4 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 10 --algos locon,loha --variants lyco"
step_table sdxl 350 $ARGS --baselines floor
(export LYCO_CONV_EPILOGUE=0; step_table sdxl_off 500 $ARGS --no-baselines)
pack_out

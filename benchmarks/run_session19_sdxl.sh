#!/usr/bin/env bash
# Issue 7 GPU run 145 (NOTES changes 95–99 at SDXL size): SDXL b4 1024 px LoRA and LoCon as graphs, the session's
# four switches on / all off (LYCO_SIDE_SPLIT, LYCO_MERGE_AHEAD, LYCO_CONV_WEIGHT_CL, LYCO_TAPS_DOWN) / on again,
# the floor alongside.
#   OUT=$OUT bash benchmarks/run_session19_sdxl.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
X="--models sdxl --batches 4 --algos lora,locon --variants lyco --rounds 1 --steps 3 --warmup 1 --graph --graph-steps 8"
step_table sdxl_on 150 $X --baselines floor
(export LYCO_SIDE_SPLIT=0 LYCO_MERGE_AHEAD=0 LYCO_CONV_WEIGHT_CL=0 LYCO_TAPS_DOWN=0
 step_table sdxl_off 240 $X --no-baselines)
step_table sdxl_on2 330 $X --no-baselines
pack_out

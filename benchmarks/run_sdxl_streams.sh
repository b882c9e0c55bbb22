#!/usr/bin/env bash
# Issue 7 GPU run 103: SDXL b4 1024 px as CUDA graphs with the session's changes (the bypass op's side stream and
# its merged weight by one Triton pass, NOTES changes 67-68) against both off, LoRA and LoCon.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_sdxl_streams.sh
. benchmarks/_gpu_lib.sh
ARGS="--models sdxl --batches 4 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 10 --variants lyco"
step_table on 250 $ARGS --algos lora,locon --baselines floor
(export LYCO_BYPASS_STREAMS=0 LYCO_MERGE_KERNEL=0; step_table off 450 $ARGS --algos lora,locon --no-baselines)

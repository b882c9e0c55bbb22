#!/usr/bin/env bash
# Issue 7 GPU run 107 (NOTES change 75): run 106 found the channels-last path slower than the NCHW epilogue at
# 64×64 and faster at 16×16 and 8×8; torch's strided copy into channels-last is the suspect, so the input now goes
# through one tiled Triton copy (lowrank_triton.channels_last). (1) every SD1.5 b8 conv layer alone: the op with
# both off, the epilogue, channels-last by the Triton copy and by torch's; (2) SD1.5 b8 graphs, LoRA/LoCon/LoHa/LoKr:
# everything on (8×8 convs now take the op channels-last), LYCO_CONV_NHWC=0, LYCO_CONV_EPILOGUE=0; (3) trainer
# graphs against eager.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_conv_nhwc.sh
. benchmarks/_gpu_lib.sh
layer_table 200 --set allconv --epilogue
ARGS="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --algos lora,locon,loha,lokr --variants lyco"
step_table on 290 $ARGS --baselines floor
(export LYCO_CONV_NHWC=0; step_table nchw 350 $ARGS --no-baselines)
(export LYCO_CONV_EPILOGUE=0; step_table off 410 $ARGS --no-baselines)
graph_check 150 lora,locon,loha,lokr,lokr-lowrank,lora-fp16,locon-rebuild
pack_out

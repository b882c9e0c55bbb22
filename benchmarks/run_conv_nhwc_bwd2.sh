#!/usr/bin/env bash
# Issue 7 GPU run 110 (NOTES change 77): change 76 again with the merged weight written channels-last by the merge
# kernel (lowrank_triton.add_lowrank_cl) instead of torch's strided copy of it — the suspect of its +2 ms.
# (1) SD1.5 b8's 3×3 convs alone: op, epilogue, channels-last forward, and the backward channels-last too;
# (2) SD1.5 b8 graphs, LoCon/LoHa/LoKr: LYCO_CONV_NHWC_BWD=1 / 0 / 1; (3) trainer graphs against eager.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_conv_nhwc_bwd2.sh
. benchmarks/_gpu_lib.sh
layer_table 130 --set conv --epilogue
ARGS="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --algos locon,loha,lokr --variants lyco"
aba LYCO_CONV_NHWC_BWD 230 290 350 $ARGS
graph_check 120 locon,loha,lokr,lora-fp16,lokr-lowrank
pack_out

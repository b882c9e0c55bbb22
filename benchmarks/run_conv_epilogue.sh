#!/usr/bin/env bash
# Issue 7 GPU run 106: the bypass op's conv forward with an epilogue (NOTES change 75) — the frozen conv without its
# bias, then y + s·U·h + b in one Triton pass (lowrank_triton.up_add; LYCO_CONV_EPILOGUE), and a k×k conv's input
# converted to channels-last once for the frozen and the adapter's conv (LYCO_CONV_NHWC), the pass writing NCHW.
# (1) every SD1.5 b8 conv layer alone (82: 3×3 and 1×1), the op with both off / the epilogue / both on;
# (2) SD1.5 b8 graphs: LoRA, LoCon, LoHa with both on (the default), both off, on again, the floor alongside;
# (3) the trainer's graphs against eager.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_conv_epilogue.sh
. benchmarks/_gpu_lib.sh
layer_table 200 --set allconv --epilogue
ARGS="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --algos lora,locon,loha --variants lyco"
aba LYCO_CONV_EPILOGUE 300 350 400 $ARGS
graph_check 140 lora,locon,loha,lokr,lora-fp16,locon-rebuild
pack_out

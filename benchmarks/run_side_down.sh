#!/usr/bin/env bash
# Issue 7 GPU run 111 (NOTES change 78): a linear op layer's forward h by a Triton GEMM (lowrank_triton.down) on the
# side stream beside the frozen GEMM (LYCO_LINEAR_SIDE_DOWN) — run 95 measured −0.3 ms for the same overlap by cuBLAS,
# whose side-stream workspace cost +0.03 GiB of peak. SD1.5 b8 graphs A/B/A with PEFT's LoRA (peak margin) alongside;
# the trainer's graphs against eager.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_side_down.sh
. benchmarks/_gpu_lib.sh
ARGS="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --algos lora,locon,loha"
aba LYCO_LINEAR_SIDE_DOWN 100 150 200 $ARGS --variants lyco
graph_check 100 lora,locon,loha,lora-fp16,lora-ckpt
pack_out

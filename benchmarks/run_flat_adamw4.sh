#!/usr/bin/env bash
# Issue 7 GPU run 119 (NOTES change 79): FlatAdamW with tensors of ≥ 2^20 elements updated as they are (not gathered)
# — Full and LoRA, A/B/A against torch's AdamW (LYCO_BENCH_OPTIM=0), SD1.5 b8 graphs.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_flat_adamw4.sh
. benchmarks/_gpu_lib.sh
aba LYCO_BENCH_OPTIM 90 160 230 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 \
  --algos full,lora --variants lyco
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 112 (NOTES change 79): lyco's adapters updated by lyco.optim.FlatAdamW — one flat buffer per group,
# one fused AdamW launch — instead of torch's fused AdamW over the separate tensors (run 109: 11 launches, 0.36 ms
# for LoRA's 384 tensors). SD1.5 b8 graphs A/B/A (LYCO_BENCH_OPTIM=0: torch's AdamW for lyco too); the trainer's
# graphs against eager (both now step FlatAdamW).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_flat_adamw.sh
. benchmarks/_gpu_lib.sh
ARGS="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --algos lora,locon,loha,lokr"
aba LYCO_BENCH_OPTIM 120 220 320 $ARGS --variants lyco
graph_check 110 lora,locon,loha,lokr
pack_out

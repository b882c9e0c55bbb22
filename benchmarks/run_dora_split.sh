#!/usr/bin/env bash
# Issue 7 GPU run 40: DoRA's Triton kernels with each layer's columns split over programs (partial row sums,
# lowrank_triton.py), launch configurations over SD1.5's 192 DoRA layers (dora_kernel_bench.py), then the whole
# training step with the default configuration against LyCORIS and PEFT (eager, two rounds, and one CUDA graph).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_dora_split.sh
. benchmarks/_gpu_lib.sh
timeout 200 python3 benchmarks/dora_kernel_bench.py --out "$OUT" 2>&1 | grep -v "float32: \[\]"
graph_check 100 dora,dora-fp16
step_table . 560 --models sd15 --batches 8 --algos dora --variants lyco,lyco-dora-detach,peft,lycoris-eager \
  --rounds 2 --steps 20 --warmup 4 --graph --graph-steps 15 --profile dora/lyco --profile-top 12

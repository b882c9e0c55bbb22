#!/usr/bin/env bash
# Issue 7 GPU run 49: SD1.5 batch 1 (512 px), where the adapters' weight-sized work weighs most against the
# activations: DoRA and GLoRA on the Triton kernels against LyCORIS (and PEFT for DoRA), and the torch path
# (LYCO_TRITON=0) in the same run; one eager round and one CUDA graph.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_b1_triton.sh
. benchmarks/_gpu_lib.sh
(export LYCO_TRITON=0; step_table torch_path 150 --models sd15 --batches 1 --algos dora,glora --variants lyco \
  --baselines floor --rounds 1 --steps 20 --warmup 4 --graph --graph-steps 15)
step_table . 330 --models sd15 --batches 1 --algos dora,glora --variants lyco,peft,lycoris-eager --baselines floor \
  --rounds 1 --steps 20 --warmup 4 --graph --graph-steps 15

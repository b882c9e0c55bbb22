#!/usr/bin/env bash
# Issue 7 GPU run 62: the factor kernels only in captured steps (LYCO_FACTOR_KERNELS=graph, the default):
# the trainer's CUDA graphs against eager with the kernels in both (check_cuda_graph sets =1), and SD1.5 b8
# LoHa/LoKr eager (torch forms) and as one CUDA graph (kernels) in one run, PEFT alongside.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_factor_policy.sh
. benchmarks/_gpu_lib.sh
graph_check 100 loha,lokr-lowrank,lokr-fp16
step_table . 400 --models sd15 --batches 8 --algos loha,lokr --variants lyco,peft --baselines floor \
  --rounds 2 --steps 12 --warmup 3 --graph --graph-steps 20

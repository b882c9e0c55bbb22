#!/usr/bin/env bash
# Issue 7 GPU run 41: GLoRA's rebuilt op building W + k·[W·A1 | B1]·[A2 ; B2] in one Triton pass
# (lowrank_triton.add_lowrank; addmm first copied W into its output) against LyCORIS (its only peer) and the
# torch path (LYCO_TRITON=0) in the same run, eager (two rounds) and one CUDA graph; the trainer's CUDA graphs
# against eager on GLoRA; DoRA's kernels with 32/64-row blocks (dora_kernel_bench.py).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_glora_triton.sh
. benchmarks/_gpu_lib.sh
timeout 150 python3 benchmarks/dora_kernel_bench.py --out "$OUT" 2>&1 | grep -v "float32: \[\]"
graph_check 80 glora
(export LYCO_TRITON=0; step_table torch_path 300 --models sd15 --batches 8 --algos glora --variants lyco \
  --baselines floor --rounds 1 --steps 20 --warmup 4 --graph --graph-steps 15)
step_table . 560 --models sd15 --batches 8 --algos glora --variants lyco,lycoris-eager --baselines floor,fullft \
  --rounds 2 --steps 20 --warmup 4 --graph --graph-steps 15 --profile glora/lyco --profile-top 12

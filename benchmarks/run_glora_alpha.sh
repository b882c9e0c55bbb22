#!/usr/bin/env bash
# Issue 7 GPU run 42: GLoRA's backward forms k·E·[A2 ; B2]ᵀ and k·[W·A1 │ B1]ᵀ·E as GEMMs with alpha = k (no
# scaling kernels), on top of run 41's one-pass Triton build; against LyCORIS in the same run (eager two rounds,
# one CUDA graph), the trainer's CUDA graphs against eager on GLoRA.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_glora_alpha.sh
. benchmarks/_gpu_lib.sh
graph_check 80 glora
step_table . 400 --models sd15 --batches 8 --algos glora,full --variants lyco,lycoris-eager --baselines floor \
  --rounds 2 --steps 20 --warmup 4 --graph --graph-steps 15 --profile glora/lyco,full/lyco,full/lycoris-eager \
  --profile-top 14

#!/usr/bin/env bash
# Issue 7 GPU run 29: DoRA's rebuilt op with its row vectors formed once in the forward (s·(g − 1), n/s,
# α = γ·s·g, κ = g/(n·‖W′‖)), so the backward's vector work is two kernels instead of ≈ 12 (dora.py); against
# LyCORIS (the best DoRA peer) and PEFT (detached norm, against lyco-dora-detach) in the same run, eager
# (two rounds) and one CUDA graph, a profile; the trainer's CUDA graphs against eager on DoRA.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_dora_vec.sh
. benchmarks/_gpu_lib.sh
graph_check 120 dora,dora-fp16,dora-ckpt
step_table . 420 --models sd15 --batches 8 --algos dora --variants lyco,lyco-dora-detach,peft,lycoris-eager \
  --rounds 2 --steps 20 --warmup 4 --graph --graph-steps 15 --profile dora/lyco --profile-top 25

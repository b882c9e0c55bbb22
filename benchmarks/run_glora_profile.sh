#!/usr/bin/env bash
# Issue 7 GPU run 36: where GLoRA's rebuilt op spends its device time over Full's (graph 81.7 vs 78.0 ms in run 30):
# profiles (top 45 kernels) of GLoRA and Full at SD1.5 b8, one round, no peers.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_glora_profile.sh
. benchmarks/_gpu_lib.sh
step_table . 200 --models sd15 --batches 8 --algos glora,full --variants lyco --no-baselines \
  --steps 10 --warmup 3 --graph --graph-steps 10 --profile glora/lyco,full/lyco --profile-top 45

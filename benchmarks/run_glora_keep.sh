#!/usr/bin/env bash
# Issue 7 GPU run 37: GLoRA's rebuilt op keeping its two rank-2r factors from the forward (the backward no longer
# recomputes W·A1 nor the two concatenations); GLoRA against LyCORIS (its only peer) and Full, eager and one CUDA
# graph, a profile; the trainer's CUDA graphs against eager on GLoRA.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_glora_keep.sh
. benchmarks/_gpu_lib.sh
graph_check 90 glora
step_table . 240 --models sd15 --batches 8 --algos glora --variants lyco,lycoris-eager --baselines floor \
  --rounds 2 --steps 20 --warmup 4 --graph --graph-steps 15 --profile glora/lyco --profile-top 30

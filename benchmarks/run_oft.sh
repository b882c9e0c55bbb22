#!/usr/bin/env bash
# Issue 7 GPU run 17: Diag-OFT on the rebuilt op with its own backward (oft.py _DiagOFTBuild; lyco =
# mode "auto" at this commit) against its delta path (lyco-bypass) and PEFT, SD1.5 b8, eager and one
# CUDA graph, two rounds; then a profile of the rebuilt BOFT step (where its device time goes).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_oft.sh
. benchmarks/_gpu_lib.sh
step_table . 230 --models sd15 --batches 8 --algos oft \
  --variants lyco,lyco-bypass,peft --steps 20 --warmup 4 --graph --graph-steps 15 --rounds 2 --budget 200
step_table boft 420 --models sd15 --batches 8 --algos boft --no-baselines \
  --variants lyco --steps 6 --warmup 2 --profile boft/lyco --profile-top 40 --budget 150
head -45 "$OUT/boft/profile.txt" | cut -c1-160

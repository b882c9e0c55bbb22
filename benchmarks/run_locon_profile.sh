#!/usr/bin/env bash
# Issue 7 GPU run 34: where LoCon's conv adapters spend their device time — profiles (top 45 kernels) of the
# floor, LoRA (linear layers only) and LoCon (the same plus 50 conv adapters, rank 8) at SD1.5 b8, one round.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_locon_profile.sh
. benchmarks/_gpu_lib.sh
step_table . 300 --models sd15 --batches 8 --algos lora,locon --variants lyco --baselines floor \
  --steps 10 --warmup 3 --graph --graph-steps 10 --profile floor/floor,lora/lyco,locon/lyco --profile-top 45

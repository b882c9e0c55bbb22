#!/usr/bin/env bash
# Pretrain the world base model + classifier on one GPU (python -m lyco.world.pretrain; issue 9).
# Runs on the device machine in the repo root with .whl carried (diffusers is not installed there;
# torch, transformers, safetensors are). About 7 minutes wall for the default 6-minute time box.
# usage: benchmarks/run_pretrain.sh [OUT] [minutes] [seed]
# then ship:  cp OUT/base.safetensors OUT/classifier.safetensors src/lyco/data/world/
set -euo pipefail
out=${1:-${OUT:-pretrain_out}}; minutes=${2:-6}; seed=${3:-0}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m lyco.world.pretrain --out "$out" --device cuda --minutes "$minutes" --seed "$seed"
ls -la "$out"

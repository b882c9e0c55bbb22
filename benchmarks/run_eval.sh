#!/usr/bin/env bash
# `lyco eval` on one GPU: every algorithm (LoRA, LoCon, LoHa, LoKr f=4 / f=-1, DoRA, OFT, BOFT, GLoRA,
# (IA)^3, Full) x both world concepts (star, stripes), trained from the shipped pretrained world base
# (src/lyco/data/world/base.safetensors + classifier.safetensors), scored, tabulated.
#
# usage (repository root, on the device machine):   benchmarks/run_eval.sh [OUTDIR] [extra lyco eval args]
# CPU smoke test: PYTHON=.venv/bin/python DEVICE=cpu benchmarks/run_eval.sh /tmp/e --quick --weights random --steps 2 --batch-size 2 --jobs 1
#   OUTDIR defaults to $OUT. Everything lands flat in OUTDIR (6 files, each < 1 MB):
#   results.json, results.md, tradeoff.png, grid_star.png, grid_stripes.png, eval.log
# Measured: 492 s on one H100 80GB (benchmarks/results/eval_h100; 22 trainings of 300 steps x batch 16,
# 4 side by side; BOFT is the long pole at ~190 s per concept). The
# tiny model is launch-bound: counted on the CPU, one training step is 3.2k (IA3) to 21k (BOFT) aten
# ops, 127k for the 11 algorithms together, so the table is ~79M kernel launches; at ~10 us of host
# time per op that is ~10 min in one process, so 4 processes share the GPU (its own time is ~2-3 us
# per tiny kernel; the H100 run came to ~5.7 us per op with 4 processes). A partial results.json/.md is written after every finished
# training, so a run cut short still returns its rows; if it does not fit, rerun with --steps 200.
set -uo pipefail
final=${1:-${OUT:-eval_out}}; shift || true
mkdir -p "$final"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ -d .whl ] && ! $py -c 'import diffusers' 2>/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$final/eval.log"
# 570 s: the device's per-command limit is 600 s; whatever finished is in results.json/.md by then
timeout 570 $py -m lyco eval --device "${DEVICE:-cuda}" --out "$final" --steps 300 --batch-size 16 --jobs 4 \
  --no-progress "$@" 2>&1 | grep -v -e 'Warning' -e 'warn(' -e 'torchvision' | tee -a "$final/eval.log"
rc=${PIPESTATUS[0]}
ls -la "$final" | tee -a "$final/eval.log"
exit "$rc"

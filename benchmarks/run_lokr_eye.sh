#!/usr/bin/env bash
# Issue 7 GPU run 148: LoKr with a full W2 (the "lokr-full" row, 1.52x the floor in run 118: every lin+conv layer on
# the rebuilt op) — a full W2's LoRA form on k×k convs (down W2 per in_m channel group, up kron(W1, I);
# LoKr.prefers_op_over_rebuild, LYCO_LOKR_EYE_POSITIONS). Every SD1.5 b8 3x3 conv alone, the form forced against
# the rebuilt op; kernels of one 8x8 and one 64x64 conv both ways; the step A/B/A against the rule off.
#   OUT=$OUT bash benchmarks/run_lokr_eye.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
layer_table 150 --algo lokr-full --set conv --reps 6
mkdir -p "$OUT/prof"
timeout 60 python3 benchmarks/experiments/bypass_op_layers.py --algo lokr-full --profile --reps 4 --out "$OUT/prof" \
  --only down_blocks.3.resnets.0.conv1,up_blocks.1.resnets.0.conv1,down_blocks.0.resnets.0.conv1 > "$OUT/prof/log.txt" 2>&1
echo "prof rc=$? wall $(( $(date +%s) - S )) s"
aba LYCO_LOKR_EYE_POSITIONS 230 290 350 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph \
  --graph-steps 20 --algos lokr-full --variants lyco
pack_out

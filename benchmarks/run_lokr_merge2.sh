#!/usr/bin/env bash
# Issue 7 GPU run 150: LoKr with a full W2 — the rebuilt op's merged weight in one Triton pass
# (factor_triton.kron_merge; run 149's profile: torch's addcmul 48 us per 13 M-element linear weight, twice per
# step). The step with PEFT alongside, A/B/A against LYCO_KRON_MERGE=0; the kernels of SD1.5's 8x8 conv on the
# op in its captured-step layout (op-nhwc).
#   OUT=$OUT bash benchmarks/run_lokr_merge2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --algos lokr-full"
step_table on 150 $A --variants lyco,peft --baselines floor
(export LYCO_KRON_MERGE=0; step_table off 190 $A --variants lyco --no-baselines)
step_table on2 230 $A --variants lyco --no-baselines
mkdir -p "$OUT/prof"
timeout 60 python3 benchmarks/experiments/bypass_op_layers.py --algo lokr-full --profile --epilogue --reps 4 \
  --out "$OUT/prof" --only down_blocks.3.resnets.0.conv1,up_blocks.1.resnets.0.conv1 > "$OUT/prof/log.txt" 2>&1
echo "prof rc=$? wall $(( $(date +%s) - S )) s"
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 149: LoKr with a full W2. (1) every SD1.5 b8 3x3 conv alone with the op's captured-step layout
# (--epilogue: op-nhwc is what a step runs) against the rebuilt op — run 148 timed the op without it; (2) the
# kernels of two linear layers on the rebuilt op with the one-pass weight-gradient kernel
# (factor_triton.kron_weight_grads); (3) the step: the kernel on / off (LYCO_FACTOR_KERNELS=0) / the eye rule at
# 0.75 instead of 4 / on again.
#   OUT=$OUT bash benchmarks/run_lokr_eye2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
layer_table 110 --algo lokr-full --set conv --reps 6 --epilogue
mkdir -p "$OUT/prof"
timeout 50 python3 benchmarks/experiments/bypass_op_layers.py --algo lokr-full --set lin --profile --reps 4 \
  --out "$OUT/prof" --only mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj,down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q \
  > "$OUT/prof/log.txt" 2>&1
echo "prof rc=$? wall $(( $(date +%s) - S )) s"
A="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --algos lokr-full --variants lyco"
step_table on 215 $A --baselines floor
(export LYCO_FACTOR_KERNELS=0; step_table off 250 $A --no-baselines)
(export LYCO_LOKR_EYE_POSITIONS=0.75; step_table t075 285 $A --no-baselines)
step_table on2 320 $A --no-baselines
pack_out

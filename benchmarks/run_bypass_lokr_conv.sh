#!/usr/bin/env bash
# Issue 7 GPU run 70: LoKr's conv adapters through the bypass op too (B on each channel group inside the op, its
# gradient by the im2col over the groups folded into the batch; commit "LoKr's conv adapters through the bypass
# op", reverted after this run: no gain — results/run70_h100_bypass_lokr_conv/summary.txt): the
# trainer's graphs against eager with the op in both; SD1.5 b8 LoKr with the op on every layer kind against
# linears only (run 68's state, LYCO_BYPASS_OP_KINDS=linear), A/B/A; then SDXL b4 LoCon with and without the op.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_bypass_lokr_conv.sh
. benchmarks/_gpu_lib.sh
graph_check 50 lokr-lowrank,lokr
ARGS="--models sd15 --batches 8 --algos lokr --variants lyco --rounds 1 --steps 4 --warmup 1 --graph --graph-steps 30"
step_table conv 95 $ARGS --baselines floor
(export LYCO_BYPASS_OP_KINDS=linear; step_table linear 125 $ARGS --no-baselines)
step_table conv2 150 $ARGS --no-baselines
X="--models sdxl --batches 4 --algos locon --variants lyco --rounds 1 --steps 3 --warmup 1 --graph --graph-steps 8"
step_table sdxl_op 195 $X --baselines floor
(export LYCO_BYPASS_OP=0; step_table sdxl_off 225 $X --no-baselines)

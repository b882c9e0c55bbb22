#!/usr/bin/env bash
# Issue 7 GPU run 65: the low-rank bypass op (lyco/algorithms/lowrank.py: exact forward, ∂x through the merged
# weight, conv ∂D by an im2col of ∂h on the NCHW input) in captured steps (LYCO_BYPASS_OP=graph, the default):
# the trainer's CUDA graphs against eager with the op in both (check_cuda_graph sets =1), then SD1.5 b8 LoRA,
# LoCon, LoHa as one CUDA graph without it, with it on both layer kinds, on convs only, on linears only.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_bypass_op.sh
. benchmarks/_gpu_lib.sh
graph_check 120 lora,locon,loha,lora-ckpt
ARGS="--models sd15 --batches 8 --algos lora,locon,loha --variants lyco --baselines floor --rounds 1 --steps 6
  --warmup 2 --graph --graph-steps 20"
(export LYCO_BYPASS_OP=0; step_table off 220 $ARGS)
step_table both 320 $ARGS
(export LYCO_BYPASS_OP_KINDS=conv2d; step_table conv 420 $ARGS)
(export LYCO_BYPASS_OP_KINDS=linear; step_table linear 520 $ARGS)

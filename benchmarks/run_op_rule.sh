#!/usr/bin/env bash
# Issue 7 GPU run 73: the bypass op with run 72's shape rule (1×1 convs at positions ≥ out, larger kernels at
# ≥ out·∏k/8) and LoKr's conv adapters through it again (a grouped down; run 70's "no gain" had the ∂y copy).
# The trainer's CUDA graphs against eager with the op in both; SD1.5 b8 LoRA, LoCon, LoHa, LoKr as CUDA graphs,
# LoKr also with its convs off the op (LYCO_BYPASS_OP_KINDS=linear: run 70's state), A/B/A.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_op_rule.sh
. benchmarks/_gpu_lib.sh
graph_check 140 lora,locon,loha,lokr-lowrank,lora-fp16
ARGS="--models sd15 --batches 8 --rounds 1 --steps 4 --warmup 2 --graph --graph-steps 20 --variants lyco"
step_table rule 400 $ARGS --algos lora,locon,loha,lokr --baselines floor
(export LYCO_BYPASS_OP_KINDS=linear; step_table lokr_lin 470 $ARGS --algos lokr --no-baselines)
step_table lokr2 540 $ARGS --algos lokr --no-baselines

#!/usr/bin/env bash
# Issue 7 GPU run 77: LoKr's low-rank W2 on linear layers through the bypass op with the grouped down (kron(I, B)
# never formed) and the op's scale in the GEMMs' alpha (no mul_ kernel per gradient when γ·m ≠ 1). The trainer's
# CUDA graphs against eager with the op in both; SD1.5 b8 LoRA, LoCon, LoHa, LoKr as CUDA graphs with alpha = rank
# (γ = 1, the table's setting) and with alpha = rank/2 (--alpha-scale 0.5: γ = 0.5, as users often train).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_grouped.sh
. benchmarks/_gpu_lib.sh
graph_check 130 lora,locon,lokr,lokr-lowrank,lokr-lowrank-ckpt
ARGS="--models sd15 --batches 8 --rounds 1 --steps 4 --warmup 2 --graph --graph-steps 20 --variants lyco
  --algos lora,locon,loha,lokr"
step_table a1 370 $ARGS --baselines floor
step_table a05 540 $ARGS --no-baselines --alpha-scale 0.5

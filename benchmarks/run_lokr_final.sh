#!/usr/bin/env bash
# Issue 7 GPU run 87: LoKr after the weight-gradient rule (LoKr._weight_grad_pays, run 85) and the kron backward
# kernel without its row loop (factor_triton._kron_grad_a): SD1.5 b8 as a CUDA graph with PEFT's LoKr in the same
# run, A/B against the rule off; SDXL b4; the trainer's graphs against eager for the LoKr cases.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_lokr_final.sh
. benchmarks/_gpu_lib.sh
ARGS="--rounds 1 --steps 4 --warmup 2 --graph --graph-steps 20"
step_table sd15 200 --models sd15 --batches 8 $ARGS --algos lokr --variants lyco,peft --baselines floor
(export LYCO_LOKR_WGRAD_PER_H=0; step_table off 250 --models sd15 --batches 8 $ARGS --algos lokr --variants lyco --no-baselines)
step_table sd15b 300 --models sd15 --batches 8 $ARGS --algos lokr --variants lyco --no-baselines
graph_check 110 lokr-lowrank,lokr-lowrank-ckpt
step_table sdxl 470 --models sdxl --batches 4 $ARGS --algos lokr --variants lyco --baselines floor

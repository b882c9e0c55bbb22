#!/usr/bin/env bash
# Issue 7 GPU run 98: the session's kept code (the bypass op's side stream, change 67; its merged weight by one
# Triton pass, change 68) — SD1.5 b8 graphs with PEFT alongside for LoRA/LoCon/LoHa/LoKr, the same four in lyco
# with both off (LYCO_BYPASS_STREAMS=0 LYCO_MERGE_KERNEL=0), then the trainer's graphs against eager.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_merge_kernel.sh
. benchmarks/_gpu_lib.sh
ARGS="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20"
step_table on 250 $ARGS --algos lora,locon,loha,lokr --variants lyco,peft --baselines floor
(export LYCO_BYPASS_STREAMS=0 LYCO_MERGE_KERNEL=0; step_table off 350 $ARGS --algos lora,locon,loha,lokr --variants lyco --no-baselines)
graph_check 170 lora,locon,loha,lokr,lora-ckpt,lora-fp16,lokr-lowrank-ckpt,lora-rebuild,locon-rebuild,loha-rebuild

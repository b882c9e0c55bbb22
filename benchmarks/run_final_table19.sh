#!/usr/bin/env bash
# Issue 7 GPU run 144 (after NOTES changes 95–99): the README's LoRA, LoCon, LoHa and LoKr rows with PEFT in the same
# run (SD1.5 b8 as graphs, the floor alongside), then the trainer's graphs against eager on the cases the session's
# paths touch.
#   OUT=$OUT bash benchmarks/run_final_table19.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
step_table table 200 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 \
  --algos lora,locon,loha,lokr --variants lyco,peft --baselines floor
graph_check 200 lora,lora-te,lora-ckpt,lora-fp16,locon,loha,lokr,lokr-lowrank-ckpt
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 180 (session 25): LYCO_INPUT_REGEN for the other algorithms whose linear layers take the bypass op
# (LoHa through its Khatri–Rao LoRA, GLoRA), on/off with PEFT in the same run; the trainer's graphs = eager for loha
# and lora-ckpt (non-reentrant checkpointing: saved-tensor hooks, where the input is kept).
# (runs 178–183 printed a subset of step_records' fields with a loop of their own)
#   OUT=$OUT bash benchmarks/run_regen_algos.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 120 loha,lora-ckpt
echo "graph_check: wall $(( $(date +%s) - S )) s"
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 230 --jobs sd15:8 --algos loha,glora --baselines floor --variants lyco,peft $A
(export LYCO_INPUT_REGEN=0; step_table s8_off 270 --jobs sd15:8 --algos loha,glora --no-baselines --variants lyco $A)
step_table x4 370 --jobs sdxl:4 --algos loha --no-baselines --variants lyco,peft $A
(export LYCO_INPUT_REGEN=0; step_table x4_off 420 --jobs sdxl:4 --algos loha --no-baselines --variants lyco $A)
step_records s8 s8_off x4 x4_off
pack_out

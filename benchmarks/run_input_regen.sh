#!/usr/bin/env bash
# Issue 7 GPU run 178 (session 25): an adapted linear layer's input regenerated in backward from its producer's kept
# tensors (LYCO_INPUT_REGEN, lyco/algorithms/regen.py: GEGLU's a and gelu(g) for ff.net.2) — bitwise against the kept
# input on the real SD1.5 config, the trainer's graphs = eager with it, and its A/B in time and peak with PEFT and the
# floor in the same run.
# (runs 178–183 printed a subset of step_records' fields with a loop of their own)
#   OUT=$OUT bash benchmarks/run_input_regen.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
regen_check 90 lora,locon
echo "regen_check: wall $(( $(date +%s) - S )) s"
graph_check 150 lora,locon
echo "graph_check: wall $(( $(date +%s) - S )) s"
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 240 --jobs sd15:8 --algos lora,locon --baselines floor --variants lyco,peft $A
(export LYCO_INPUT_REGEN=0; step_table s8_off 280 --jobs sd15:8 --algos lora,locon --no-baselines --variants lyco $A)
step_table x4 400 --jobs sdxl:4 --algos lora --baselines floor --variants lyco,peft $A
(export LYCO_INPUT_REGEN=0; step_table x4_off 440 --jobs sdxl:4 --algos lora --no-baselines --variants lyco $A)
step_table x1 520 --jobs sdxl:1 --algos lora --baselines floor --variants lyco,peft $A
step_records s8 s8_off x4 x4_off x1
pack_out

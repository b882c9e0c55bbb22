#!/usr/bin/env bash
# Issue 7 GPU run 185 (session 26): LYCO_REGEN_KERNEL — ∂D of a regenerated product input read from its two operands
# by one Triton kernel (lyco.algorithms.regen_triton) — its tiles swept alone, its gradients on the real SD1.5 config
# against the kept input's, the trainer's graphs against eager, and the step with it on / off / on (SD1.5 b8 LoRA, the
# floor and PEFT alongside; SDXL b4 LoRA on / off with PEFT).
#   OUT=$OUT bash benchmarks/run_regen_kernel.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
mkdir -p "$OUT/wgrad"
timeout 60 python3 benchmarks/experiments/regen_wgrad_bench.py "$OUT/wgrad" > "$OUT/wgrad/log.txt" 2>&1
echo "wgrad rc=$?"; grep "sum µs" "$OUT/wgrad/log.txt"
regen_check 100 lora
graph_check 100 lora,locon
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 280 --jobs sd15:8 --algos lora --baselines floor --variants lyco,peft $A
(export LYCO_REGEN_KERNEL=0; step_table s8_off 300 --jobs sd15:8 --algos lora --no-baselines --variants lyco $A)
step_table s8_on2 320 --jobs sd15:8 --algos lora --no-baselines --variants lyco $A
step_table x4 420 --jobs sdxl:4 --algos lora --no-baselines --variants lyco,peft $A
(export LYCO_REGEN_KERNEL=0; step_table x4_off 480 --jobs sdxl:4 --algos lora --no-baselines --variants lyco $A)
step_records s8 s8_off s8_on2 x4 x4_off
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 190 (session 26): the ∂D kernel's second launch summing 16 row splits per load and ∂h read along its
# rows, the norm kind's own tiles (run 189) — both kinds' products alone, then LYCO_NORM_REGEN on / off / on (SD1.5 b8
# LoRA with the floor and PEFT, SDXL b4 LoRA with PEFT).
#   OUT=$OUT bash benchmarks/run_norm_regen2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
mkdir -p "$OUT/wgrad"
timeout 60 python3 benchmarks/experiments/regen_wgrad_bench.py "$OUT/wgrad" > "$OUT/wgrad/log.txt" 2>&1
echo "wgrad rc=$?"; grep "sum µs" "$OUT/wgrad/log.txt"
timeout 60 python3 benchmarks/experiments/regen_wgrad_bench.py "$OUT/wgrad" --norm > "$OUT/wgrad/log_norm.txt" 2>&1
echo "wgrad norm rc=$?"; grep "sum µs\|per config" "$OUT/wgrad/log_norm.txt"
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 150 --jobs sd15:8 --algos lora --baselines floor --variants lyco,peft $A
(export LYCO_NORM_REGEN=0; step_table s8_off 170 --jobs sd15:8 --algos lora --no-baselines --variants lyco $A)
step_table s8_on2 190 --jobs sd15:8 --algos lora --no-baselines --variants lyco $A
step_table x4 290 --jobs sdxl:4 --algos lora --no-baselines --variants lyco,peft $A
(export LYCO_NORM_REGEN=0; step_table x4_off 340 --jobs sdxl:4 --algos lora --no-baselines --variants lyco $A)
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records s8 s8_off s8_on2 x4 x4_off
pack_out

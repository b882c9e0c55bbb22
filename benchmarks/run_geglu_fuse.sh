#!/usr/bin/env bash
# Issue 7 GPU run 195 (session 27): change 120 — a GEGLU's backward run by the bypass op of ff.net.2 with its ∂D in
# one Triton kernel (LYCO_GEGLU_FUSE). The kernel alone against torch's chain (tile settings), gradients on the real
# SD1.5 config, the trainer's graphs against eager, then the step on / off / on: SD1.5 b8 LoRA with the floor and
# PEFT, SDXL b4 LoRA with PEFT.
#   OUT=$OUT bash benchmarks/run_geglu_fuse.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
mkdir -p "$OUT/bench"
timeout 240 python3 benchmarks/experiments/geglu_bwd_bench.py "$OUT/bench" > "$OUT/bench/log.txt" 2>&1
rc=$?
echo "geglu_bwd_bench rc=$rc wall $(( $(date +%s) - S )) s"; grep -E "^sd15|^sdxl|Error|error" "$OUT/bench/log.txt" | cut -c1-400
[ $rc -eq 0 ] || { pack_out; exit 1; }
regen_check 150 lora
graph_check 100 lora
echo "checks: wall $(( $(date +%s) - S )) s"
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 330 --jobs sd15:8 --algos lora --baselines floor --variants lyco,peft $A
(export LYCO_GEGLU_FUSE=0; step_table s8_off 360 --jobs sd15:8 --algos lora --no-baselines --variants lyco $A)
step_table s8_on2 390 --jobs sd15:8 --algos lora --no-baselines --variants lyco $A
step_table x4 470 --jobs sdxl:4 --algos lora --no-baselines --variants lyco,peft $A
(export LYCO_GEGLU_FUSE=0; step_table x4_off 510 --jobs sdxl:4 --algos lora --no-baselines --variants lyco $A)
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records s8 s8_off s8_on2 x4 x4_off
pack_out

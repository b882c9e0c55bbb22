#!/usr/bin/env bash
# Issue 7 GPU run 199 (session 27): change 120 against a floor given the same GEGLU backward (floor-geglu: every frozen
# ff.net.2 takes its GEGLU's backward into one kernel pass, train_step.fuse_frozen_geglu) — SD1.5 b8, SDXL b4 and b1:
# floor, floor-geglu, LoRA; SD1.5 b1: the floor, LoRA and LoCon with PEFT. The kernel alone at its setting first.
#   OUT=$OUT bash benchmarks/run_geglu_floor.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
mkdir -p "$OUT/bench"
timeout 120 python3 benchmarks/experiments/geglu_bwd_bench.py "$OUT/bench" --quick > "$OUT/bench/log.txt" 2>&1
echo "geglu_bwd_bench rc=$? wall $(( $(date +%s) - S )) s"; grep -E "sum µs|Error|error" "$OUT/bench/log.txt" | cut -c1-300
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 120 --jobs sd15:8 --algos lora --baselines floor,floor-geglu --variants lyco $A
step_table x4 260 --jobs sdxl:4 --algos lora --baselines floor,floor-geglu --variants lyco $A
step_table x1 350 --jobs sdxl:1 --algos lora --baselines floor,floor-geglu --variants lyco $A
step_table s1 450 --jobs sd15:1 --algos lora,locon --baselines floor,floor-geglu --variants lyco,peft $A
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records s8 x4 x1 s1
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 212 (session 28): where SD1.5 b1's captured LoRA and LoCon steps spend their time over the floor
# (LoRA 0.844×, LoCon 0.805× PEFT after session 27) — one replay of each under the profiler (train_step --graph-trace):
# floor-geglu, LoRA, LoCon and PEFT's LoCon; graph_trace.py's differences.
#   OUT=$OUT bash benchmarks/run_b1_trace.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --jobs sd15:1 --graph-trace all"
step_table tr 300 --baselines floor-geglu --variants lyco,peft --algos lora,locon $A
T="$OUT/tr/graph_trace_sd15_b1"
gzip "$OUT"/tr/graph_trace_*.json
echo "== locon - floor-geglu"; python3 benchmarks/graph_trace.py ${T}_locon_lyco.json.gz ${T}_floor-geglu_floor-geglu.json.gz --top 30 | tail -45
echo "== lora - floor-geglu"; python3 benchmarks/graph_trace.py ${T}_lora_lyco.json.gz ${T}_floor-geglu_floor-geglu.json.gz --top 25 | tail -35
echo "== locon - lora"; python3 benchmarks/graph_trace.py ${T}_locon_lyco.json.gz ${T}_lora_lyco.json.gz --top 20 | tail -30
step_records tr
pack_out

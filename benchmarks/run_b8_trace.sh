#!/usr/bin/env bash
# Issue 7 GPU run 230 (session 30): where SD1.5 b8's captured LoRA step (0.795× PEFT, 1.049× the floor in run 229)
# spends its time over the floor at this session's code — one replay of each under the profiler (--graph-trace):
# the floor and LoRA; graph_trace.py's difference.
#   OUT=$OUT bash benchmarks/run_b8_trace.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --jobs sd15:8 --graph-trace all"
step_table tr 200 --baselines floor --variants lyco --algos lora $A
gzip "$OUT"/tr/graph_trace_*.json
T="$OUT/tr/graph_trace_sd15_b8"
echo "== lora - floor"; python3 benchmarks/graph_trace.py ${T}_lora_lyco.json.gz ${T}_floor_floor.json.gz --top 40 | tail -55
step_records tr
pack_out

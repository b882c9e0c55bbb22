#!/usr/bin/env bash
# Issue 7 GPU run 239 (session 32): change 134 (lowrank._merged_pays, default c = 1) — SD1.5 b1 LoRA's timeline beside
# floor-geglu (graph_trace.py's difference: what remains), and c = 0 / 1 for the other users of the bypass op at
# SD1.5 b1: LoCon, LoHa (its rank-64 Khatri–Rao form) and GLoRA.
#   OUT=$OUT bash benchmarks/run_merged_rows2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --jobs sd15:1"
step_table tr 80 --baselines floor-geglu --variants lyco --algos lora $A --graph-trace lora/lyco,floor-geglu/floor-geglu
step_table c1 150 --no-baselines --variants lyco --algos locon,loha,glora $A
(export LYCO_MERGED_ROWS=0; step_table c0 220 --no-baselines --variants lyco --algos locon,loha,glora $A)
T="$OUT/tr/graph_trace_sd15_b1"
gzip "$OUT"/tr/graph_trace_*.json
echo "== lora - floor-geglu"; python3 benchmarks/graph_trace.py ${T}_lora_lyco.json.gz ${T}_floor-geglu_floor-geglu.json.gz --top 30 | tail -42
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records tr c1 c0
pack_out

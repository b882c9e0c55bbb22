#!/usr/bin/env bash
# Issue 7 GPU run 204 (session 27): why (IA)³ gained 1.1 ms from change 120b at SD1.5 b8 where the floor gains 2.6 from
# the same kernel — one captured step's timeline each (train_step --graph-trace): (IA)³ with and without
# LYCO_GEGLU_FUSE, the floor and floor-geglu; graph_trace.py's differences.
#   OUT=$OUT bash benchmarks/run_ia3_trace.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --jobs sd15:8 --algos ia3 --graph-trace all"
step_table on 300 --baselines floor,floor-geglu --variants lyco $A
mkdir -p "$OUT/off"
(export LYCO_GEGLU_FUSE=0; step_table off 330 --no-baselines --variants lyco $A)
for f in "$OUT"/on/graph_trace_*.json; do gzip -k "$f"; done
gzip -k "$OUT"/off/graph_trace_*.json
T=graph_trace_sd15_b8
echo "== ia3 on - off"; python3 benchmarks/graph_trace.py "$OUT/on/${T}_ia3_lyco.json" "$OUT/off/${T}_ia3_lyco.json" --top 10
echo "== floor-geglu - floor"; python3 benchmarks/graph_trace.py "$OUT/on/${T}_floor-geglu_floor-geglu.json" "$OUT/on/${T}_floor_floor.json" --top 10
echo "== ia3 on - floor-geglu"; python3 benchmarks/graph_trace.py "$OUT/on/${T}_ia3_lyco.json" "$OUT/on/${T}_floor-geglu_floor-geglu.json" --top 10
rm -f "$OUT"/on/graph_trace_*.json "$OUT"/off/graph_trace_*.json
step_records on off
pack_out

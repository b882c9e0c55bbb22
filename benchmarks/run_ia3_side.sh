#!/usr/bin/env bash
# Issue 7 GPU run 207 (session 28): (IA)³ after run 206 — the channel gradient's tile settings swept around run 206's
# best (now the default) and ∂w on the side stream beside the ∂x GEMM (A/B: LYCO_BYPASS_STREAMS=0); the trainer's
# graphs against eager (ia3); one captured step's timeline of (IA)³ and floor-geglu (graph_trace.py's difference).
#   OUT=$OUT bash benchmarks/run_ia3_side.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
mkdir -p $OUT/kbench
timeout 200 python3 benchmarks/experiments/ia3_kernel_bench.py $OUT/kbench --channel-only > $OUT/kbench/log.txt 2>&1
echo "kbench rc=$? wall $(( $(date +%s) - S )) s"
grep -A8 "^== " $OUT/kbench/log.txt
graph_check 80 ia3
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --jobs sd15:8 --algos ia3"
step_table s8 420 --baselines floor-geglu --variants lyco,peft $A
(export LYCO_BYPASS_STREAMS=0; step_table s8_nostreams 450 --no-baselines --variants lyco $A)
step_table tr 520 --baselines floor-geglu --variants lyco $A --graph-trace all
T=graph_trace_sd15_b8
gzip "$OUT"/tr/graph_trace_*.json
echo "== ia3 - floor-geglu"; python3 benchmarks/graph_trace.py "$OUT/tr/${T}_ia3_lyco.json.gz" "$OUT/tr/${T}_floor-geglu_floor-geglu.json.gz" --top 25
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records s8 s8_nostreams tr
pack_out

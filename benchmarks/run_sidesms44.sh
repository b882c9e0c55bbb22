#!/usr/bin/env bash
# Issue 7, prepared in session 43 for the next: SDXL b1 LoKr with LYCO_SIDE_SMS at 32 (the default) / 0 / 32 — run 308
# missed it — and one replay of SDXL b1 LoRA traced at 32 and at 0 (graph_trace.py: does the frozen 1280² GEMMs'
# median come back toward the floor's 8.1 µs from 12.0, run 300? what happened to the 480 splitKreduce launches?).
#   OUT=$OUT bash benchmarks/run_sidesms44.sh      (carry .whl; ≈ 330 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco --jobs sdxl:1"
step_table on 150 $A --algos lora,lokr --baselines floor --graph-trace floor/floor,lora/lyco
(export LYCO_SIDE_SMS=0; step_table off 240 $A --algos lora,lokr --no-baselines --graph-trace lora/lyco)
step_table on2 290 $A --algos lokr --no-baselines
gzip "$OUT"/*/graph_trace_*.json
python3 benchmarks/graph_trace.py $OUT/on/graph_trace_sdxl_b1_lora_lyco.json.gz \
  $OUT/off/graph_trace_sdxl_b1_lora_lyco.json.gz | cut -c1-220
python3 benchmarks/graph_trace.py $OUT/on/graph_trace_sdxl_b1_lora_lyco.json.gz \
  $OUT/on/graph_trace_sdxl_b1_floor_floor.json.gz | cut -c1-220
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2
pack_out

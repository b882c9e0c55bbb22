#!/usr/bin/env bash
# Issue 7, session 42: where the batch-1 misses' time goes now that the graphs' memset nodes are kernel nodes
# (graph_memsets on by default, run 298): SDXL b1 floor / LoRA / LoKr and SD1.5 b1 floor / LoCon, one replay each
# traced (graph_trace.py splits the span into idle and each kernel's exposed time).
#   OUT=$OUT bash benchmarks/run_trace42.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco --baselines floor"
step_table xl 200 $A --jobs sdxl:1 --algos lora,lokr --graph-trace floor/floor,lora/lyco,lokr/lyco
step_table sd 290 $A --jobs sd15:1 --algos locon,lora --graph-trace floor/floor,locon/lyco,lora/lyco
gzip "$OUT"/*/graph_trace_*.json
for m in sdxl_b1_lora sdxl_b1_lokr; do
  python3 benchmarks/graph_trace.py $OUT/xl/graph_trace_${m}_lyco.json.gz $OUT/xl/graph_trace_sdxl_b1_floor_floor.json.gz | cut -c1-220
done
for m in sd15_b1_locon sd15_b1_lora; do
  python3 benchmarks/graph_trace.py $OUT/sd/graph_trace_${m}_lyco.json.gz $OUT/sd/graph_trace_sd15_b1_floor_floor.json.gz | cut -c1-220
done
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records xl sd
pack_out

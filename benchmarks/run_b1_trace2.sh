#!/usr/bin/env bash
# Issue 7 GPU run 237 (session 32): SD1.5 b1 LoRA after change 133 (the forward through merged weights built ahead) —
# one replay under the profiler beside floor-geglu (graph_trace.py's difference); change 133's depth 2 and 3
# (LYCO_FORWARD_MERGED_DEPTH); change 133 on / off at SDXL b1 LoRA and SD1.5 b1 LoCon.
#   OUT=$OUT bash benchmarks/run_b1_trace2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table tr 120 --baselines floor-geglu --variants lyco,peft --algos lora --jobs sd15:1 $A --graph-trace lora/lyco,floor-geglu/floor-geglu
(export LYCO_FORWARD_MERGED_DEPTH=2; step_table d2 155 --no-baselines --variants lyco --algos lora --jobs sd15:1 $A)
(export LYCO_FORWARD_MERGED_DEPTH=3; step_table d3 190 --no-baselines --variants lyco --algos lora --jobs sd15:1 $A)
step_table d1 225 --no-baselines --variants lyco --algos lora --jobs sd15:1 $A
step_table c1 260 --no-baselines --variants lyco --algos locon --jobs sd15:1 $A
(export LYCO_FORWARD_MERGED=0; step_table c1off 295 --no-baselines --variants lyco --algos locon --jobs sd15:1 $A)
step_table x1 350 --no-baselines --variants lyco --algos lora --jobs sdxl:1 $A
(export LYCO_FORWARD_MERGED=0; step_table x1off 405 --no-baselines --variants lyco --algos lora --jobs sdxl:1 $A)
T="$OUT/tr/graph_trace_sd15_b1"
gzip "$OUT"/tr/graph_trace_*.json
echo "== lora - floor-geglu"; python3 benchmarks/graph_trace.py ${T}_lora_lyco.json.gz ${T}_floor-geglu_floor-geglu.json.gz --top 40 | tail -55
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records tr d2 d3 d1 c1 c1off x1 x1off
pack_out

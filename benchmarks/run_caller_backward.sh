#!/usr/bin/env bash
# Issue 7 GPU run 174 (session 24): (1) train_step.py's peaks counted per configuration (fresh_memory: torch's cuBLAS
# workspaces of earlier configurations freed first — before, a peer measured after lyco carried lyco's side-stream
# workspaces); (2) graph_step runs the backward on the calling thread (LYCO_CALLER_BACKWARD; every variant alike), so
# the forward's down beside the frozen GEMM (LYCO_FORWARD_SIDE, run 171's cuBLAS form) costs no workspace of its own.
# New (both on) with the floor and PEFT in the same process, and lyco's previous behaviour (both off) alone: SDXL b4,
# SDXL b1 (LoRA, LoCon), SD1.5 b8 — times and peaks (eager and the graph's).
#   OUT=$OUT bash benchmarks/run_caller_backward.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
OLD="LYCO_CALLER_BACKWARD=0 LYCO_FORWARD_SIDE=0"
step_table x4 130 --jobs sdxl:4 --algos lora --baselines floor --variants lyco,peft $A
(export $OLD; step_table x4_old 175 --jobs sdxl:4 --algos lora --no-baselines --variants lyco $A)
step_table x1 300 --jobs sdxl:1 --algos lora,locon --baselines floor --variants lyco,peft $A
(export $OLD; step_table x1_old 340 --jobs sdxl:1 --algos lora --no-baselines --variants lyco $A)
step_table s8 420 --jobs sd15:8 --algos lora --baselines floor --variants lyco,peft $A
(export $OLD; step_table s8_old 460 --jobs sd15:8 --algos lora --no-baselines --variants lyco $A)
for d in x4 x4_old x1 x1_old s8 s8_old; do
  python3 -c "import json; r=json.load(open('$OUT/$d/train_step.json')); [print('$d', x['model'], x['batch'], x['algo'], x['variant'], 'graph', round(x.get('graph_median_ms') or 0, 2), 'peak', round(x.get('peak_gib') or 0, 3), 'graph_peak', round(x.get('graph_peak_gib') or 0, 3)) for x in r['records']]" 2>/dev/null
done
pack_out

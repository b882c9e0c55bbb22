#!/usr/bin/env bash
# Issue 7 GPU run 175 (session 24): after run 174 — the trainer's captured steps against eager with the backward on
# the calling thread and the forward's down beside the frozen GEMM (check_cuda_graph.py); SD1.5 b8's other low-rank
# rows with PEFT under train_step.py's per-configuration peaks (fresh_memory); SD1.5 b1 LoRA new / previous with
# the floor and PEFT.
#   OUT=$OUT bash benchmarks/run_caller_backward2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 190 lora,lora-te,lora-ckpt,lora-fp16,locon,loha,lokr,lokr-lowrank-ckpt,dora
echo "graph_check: wall $(( $(date +%s) - S )) s"
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
OLD="LYCO_CALLER_BACKWARD=0 LYCO_FORWARD_SIDE=0"
step_table s8 400 --jobs sd15:8 --algos locon,loha,lokr,dora --no-baselines --variants lyco,peft $A
step_table s1 450 --jobs sd15:1 --algos lora --baselines floor --variants lyco,peft $A
(export $OLD; step_table s1_old 480 --jobs sd15:1 --algos lora --no-baselines --variants lyco $A)
for d in s8 s1 s1_old; do
  python3 -c "import json; r=json.load(open('$OUT/$d/train_step.json')); [print('$d', x['model'], x['batch'], x['algo'], x['variant'], 'graph', round(x.get('graph_median_ms') or 0, 2), 'peak', round(x.get('peak_gib') or 0, 3), 'graph_peak', round(x.get('graph_peak_gib') or 0, 3)) for x in r['records']]" 2>/dev/null
done
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 176 (session 24): the trainer's captured steps against eager for the cases run 175's check did not
# reach (dora, loha) with the backward on the calling thread; SDXL b4 LoRA with the floor and PEFT once more (run 174:
# 0.801× PEFT); SD1.5 b1 LoRA with the floor and PEFT, and lyco's previous behaviour alone.
#   OUT=$OUT bash benchmarks/run_caller_backward3.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 80 dora,loha
echo "graph_check: wall $(( $(date +%s) - S )) s"
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
OLD="LYCO_CALLER_BACKWARD=0 LYCO_FORWARD_SIDE=0"
step_table x4 170 --jobs sdxl:4 --algos lora --baselines floor --variants lyco,peft $A
step_table s1 230 --jobs sd15:1 --algos lora --baselines floor --variants lyco,peft $A
(export $OLD; step_table s1_old 260 --jobs sd15:1 --algos lora --no-baselines --variants lyco $A)
for d in x4 s1 s1_old; do
  python3 -c "import json; r=json.load(open('$OUT/$d/train_step.json')); [print('$d', x['model'], x['batch'], x['algo'], x['variant'], 'graph', round(x.get('graph_median_ms') or 0, 2), 'peak', round(x.get('peak_gib') or 0, 3), 'graph_peak', round(x.get('graph_peak_gib') or 0, 3)) for x in r['records']]" 2>/dev/null
done
pack_out

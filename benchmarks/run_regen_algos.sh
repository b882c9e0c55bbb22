#!/usr/bin/env bash
# Issue 7 GPU run 180 (session 25): LYCO_INPUT_REGEN for the other algorithms whose linear layers take the bypass op
# (LoHa through its Khatri–Rao LoRA, GLoRA), on/off with PEFT in the same run; the trainer's graphs = eager for loha
# and lora-ckpt (non-reentrant checkpointing: saved-tensor hooks, where the input is kept).
#   OUT=$OUT bash benchmarks/run_regen_algos.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 120 loha,lora-ckpt
echo "graph_check: wall $(( $(date +%s) - S )) s"
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 230 --jobs sd15:8 --algos loha,glora --baselines floor --variants lyco,peft $A
(export LYCO_INPUT_REGEN=0; step_table s8_off 270 --jobs sd15:8 --algos loha,glora --no-baselines --variants lyco $A)
step_table x4 370 --jobs sdxl:4 --algos loha --no-baselines --variants lyco,peft $A
(export LYCO_INPUT_REGEN=0; step_table x4_off 420 --jobs sdxl:4 --algos loha --no-baselines --variants lyco $A)
for d in s8 s8_off x4 x4_off; do
  python3 -c "import json; r=json.load(open('$OUT/$d/train_step.json')); [print('$d', x['model'], x['batch'], x['algo'], x['variant'], 'graph', round(x.get('graph_median_ms') or 0, 2), 'peak', round(x.get('peak_gib') or 0, 3), 'graph_peak', round(x.get('graph_peak_gib') or 0, 3), x.get('status')) for x in r['records']]" 2>/dev/null
done
pack_out

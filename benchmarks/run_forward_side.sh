#!/usr/bin/env bash
# Issue 7 GPU run 171 (session 23): SDXL b4 LoRA with PEFT in the same run (runs 161/165 compared across runs); the
# forward's down h = x·Dᵀ on the side stream beside the frozen GEMM (LYCO_FORWARD_SIDE=graph: linear layers and the
# q/k/v group op), A/B against it off, at SDXL b1, SD1.5 b8 and SD1.5 b1 — time and the graph's peak.
#   OUT=$OUT bash benchmarks/run_forward_side.sh      (carry .whl)
# After the run: LYCO_FORWARD_SIDE was tried with cuBLAS here, then with a Triton kernel (run 172); neither kept —
# the switch is gone from the tree (NOTES change 113), so on a later tree its legs run the default.
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table x4 140 --jobs sdxl:4 --algos lora --baselines floor --variants lyco,peft $A
A="$A --variants lyco --no-baselines"
(export LYCO_FORWARD_SIDE=graph; step_table x1_fs 185 --jobs sdxl:1 --algos lora,locon $A)
step_table x1_base 215 --jobs sdxl:1 --algos lora $A
(export LYCO_FORWARD_SIDE=graph; step_table x1_fs2 245 --jobs sdxl:1 --algos lora $A)
(export LYCO_FORWARD_SIDE=graph; step_table s8_fs 275 --jobs sd15:8 --algos lora $A)
step_table s8_base 300 --jobs sd15:8 --algos lora $A
(export LYCO_FORWARD_SIDE=graph; step_table s1_fs 325 --jobs sd15:1 --algos lora $A)
step_table s1_base 350 --jobs sd15:1 --algos lora $A
for d in x4 x1_fs x1_base x1_fs2 s8_fs s8_base s1_fs s1_base; do
  python3 -c "import json; r=json.load(open('$OUT/$d/train_step.json')); [print('$d', x['algo'], x['variant'], 'peak', round(x.get('peak_gib') or 0, 3), 'graph_peak', round(x.get('graph_peak_gib') or 0, 3)) for x in r['records']]"
done
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 172 (session 23): change 113, a linear layer's forward down h = x·Dᵀ on the side stream beside the
# frozen GEMM by a Triton kernel (lowrank_triton.down: no cuBLAS workspace for the forward's thread on that stream;
# run 171 had cuBLAS there, +0.03 GiB on the graph's peak) — on by default in captured steps (LYCO_FORWARD_SIDE),
# A/B against it off at SDXL b1, SD1.5 b8 and SD1.5 b1 with the graph's peak; the trainer's graphs against eager for
# LoRA with it; SDXL b4 LoRA with PEFT in the same run.
#   OUT=$OUT bash benchmarks/run_forward_down.sh      (carry .whl)
# After the run: slower (NOTES change 113); reverted with the switch — on a later tree every leg runs the default.
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 70 lora
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
step_table x1_new 175 --jobs sdxl:1 --algos lora,locon --baselines floor $A
(export LYCO_FORWARD_SIDE=0; step_table x1_off 215 --jobs sdxl:1 --algos lora --no-baselines $A)
step_table s8_new 260 --jobs sd15:8 --algos lora --baselines floor $A
(export LYCO_FORWARD_SIDE=0; step_table s8_off 290 --jobs sd15:8 --algos lora --no-baselines $A)
step_table s1_new 325 --jobs sd15:1 --algos lora --baselines floor $A
(export LYCO_FORWARD_SIDE=0; step_table s1_off 355 --jobs sd15:1 --algos lora --no-baselines $A)
step_table x4 400 --jobs sdxl:4 --algos lora --no-baselines --variants lyco,peft --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15
for d in x1_new x1_off s8_new s8_off s1_new s1_off x4; do
  python3 -c "import json; r=json.load(open('$OUT/$d/train_step.json')); [print('$d', x['model'], x['batch'], x['algo'], x['variant'], 'graph', round(x.get('graph_median_ms') or 0, 2), 'peak', round(x.get('peak_gib') or 0, 3), 'graph_peak', round(x.get('graph_peak_gib') or 0, 3)) for x in r['records']]"
done
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 213 (session 28): after the fix to change 121's edit of regen_triton (the product-gradient kernel) —
# the trainer's graphs against eager (lora, locon, ia3); SD1.5 b8 LoRA with the floor (the product-gradient and GEGLU
# kernels LoRA runs; the self-tests' warnings counted); SDXL b4 (IA)³ with PEFT after change 122.
#   OUT=$OUT bash benchmarks/run_session28_check.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 150 lora,locon,ia3
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 300 --baselines floor --variants lyco --jobs sd15:8 --algos lora $A
step_table x4 480 --no-baselines --variants lyco,peft --jobs sdxl:4 --algos ia3 $A
echo "self-test warnings: $(cat $OUT/*/train_step.log $OUT/check_cuda_graph.log | grep -c 'self-test')"
grep -h "self-test" $OUT/*/train_step.log $OUT/check_cuda_graph.log | sort | uniq -c | head
step_records s8 x4
pack_out

#!/usr/bin/env bash
# Issue 7 GPU runs 217–218 (session 29; run 217 found the self-test comparing against a TF32 reference): Diag-OFT with its rows' rotation and Cayley backward as Triton launches
# (oft_triton.rotate_rows / cayley_grad) and its output kept — SDXL b4 forced on (eager too: the script's gradient check
# covers both kernels) beside PEFT's OFT; SD1.5 b8 and b1, SDXL b1 with PEFT; SD1.5 b1 (IA)³ with PEFT (not measured
# since change 108).
#   OUT=$OUT bash benchmarks/run_oft_kernels.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
(export LYCO_OFT_KEEP_OUTPUT=1 LYCO_OFT_KERNELS=1; step_table x4 150 --no-baselines --variants lyco,peft --jobs sdxl:4 --algos oft --graph-trace oft/lyco $A)
step_table s8 260 --no-baselines --variants lyco,peft --jobs sd15:8 --algos oft $A
step_table b1 320 --no-baselines --variants lyco,peft --jobs sd15:1 --algos oft $A
step_table x1 450 --no-baselines --variants lyco,peft --jobs sdxl:1 --algos oft $A
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
grep -h "RuntimeWarning: lyco" $OUT/*/train_step.log | sort | uniq -c | head
step_records x4 s8 b1 x1
pack_out

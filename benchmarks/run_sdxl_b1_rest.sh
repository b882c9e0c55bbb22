#!/usr/bin/env bash
# Issue 7 GPU run 222 (session 29): SDXL b1 cells with no measurement yet — (IA)³ and DoRA against PEFT's.
#   OUT=$OUT bash benchmarks/run_sdxl_b1_rest.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table x1 170 --no-baselines --variants lyco,peft --jobs sdxl:1 --algos ia3,dora $A
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x1
pack_out

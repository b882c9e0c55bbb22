#!/usr/bin/env bash
# Issue 7 GPU run 220 (session 29): the batch-1 cells left open — SD1.5 b1 LoKr and LoKr with a full W2 against the
# floor (run 219's deadline left them out), SDXL b1 LoKr and LoKr full against PEFT's LoKr (no peer measured there yet).
#   OUT=$OUT bash benchmarks/run_lokr_b1.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table b1 90 --baselines floor --variants lyco --jobs sd15:1 --algos lokr,lokr-full $A
step_table x1 330 --no-baselines --variants lyco,peft --jobs sdxl:1 --algos lokr,lokr-full $A
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records b1 x1
pack_out

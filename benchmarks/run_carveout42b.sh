#!/usr/bin/env bash
# Issue 7, session 42: run 301's one gain of the SM carveout probe (SDXL b1 LoRA 68.38 -> 67.88 ms at 16 SMs; 8 and
# 32 SMs slower, SD1.5 b1 within 0.1 ms) repeated: SDXL b1 LoRA and LoKr with LYCO_PROBE_SM_CARVEOUT unset / 16 /
# unset / 16, the floor in the first leg.
#   OUT=$OUT bash benchmarks/run_carveout42b.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --jobs sdxl:1 --algos lora,lokr"
step_table c0 110 $A --baselines floor
(export LYCO_PROBE_SM_CARVEOUT=16; step_table c16 170 $A --no-baselines)
step_table c0b 230 $A --no-baselines
(export LYCO_PROBE_SM_CARVEOUT=16; step_table c16b 290 $A --no-baselines)
grep -h "sm carveout" $OUT/*/train_step.log | sort | uniq -c | cut -c1-250
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records c0 c16 c0b c16b
pack_out

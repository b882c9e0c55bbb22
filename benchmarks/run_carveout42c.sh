#!/usr/bin/env bash
# Issue 7, session 42: lyco.train.blas_carveout (the library form of runs 301-302's probe, set during lyco's
# captures only) at SDXL b1 LoRA, LYCO_BLAS_CARVEOUT 16 / 0 / 16, the floor in the first leg.
#   OUT=$OUT bash benchmarks/run_carveout42c.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --jobs sdxl:1 --algos lora"
(export LYCO_BLAS_CARVEOUT=16; step_table on 100 $A --baselines floor)
(export LYCO_BLAS_CARVEOUT=0; step_table off 145 $A --no-baselines)
(export LYCO_BLAS_CARVEOUT=16; step_table on2 190 $A --no-baselines)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
grep -h "RuntimeWarning: lyco" $OUT/*/train_step.log | sort | uniq -c | cut -c1-300 | head -3
step_records on off on2
pack_out

#!/usr/bin/env bash
# Issue 7, prepared in session 42 for the next: LYCO_BLAS_CARVEOUT (lyco.train.blas_carveout, off by default) where
# the GEMMs are many waves — SD1.5 b8 and SDXL b4, LoRA and LoKr, 16 / 0 / 16 (the floor never takes it: lyco's
# captures only) — if no loss there, blas_carveout.DEFAULT = "16"; and SD1.5 b1 LoHa with the memset nodes replaced
# (change 166; not re-measured in session 42).
#   OUT=$OUT bash benchmarks/run_carveout43.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lora,lokr"
(export LYCO_BLAS_CARVEOUT=16; step_table b8on 120 $A --jobs sd15:8 --baselines floor)
(export LYCO_BLAS_CARVEOUT=0; step_table b8off 170 $A --jobs sd15:8 --no-baselines)
(export LYCO_BLAS_CARVEOUT=16; step_table b8on2 220 $A --jobs sd15:8 --no-baselines)
(export LYCO_BLAS_CARVEOUT=16; step_table xl4on 300 $A --jobs sdxl:4 --baselines floor)
(export LYCO_BLAS_CARVEOUT=0; step_table xl4off 370 $A --jobs sdxl:4 --no-baselines)
(export LYCO_BLAS_CARVEOUT=16; step_table xl4on2 440 $A --jobs sdxl:4 --no-baselines)
step_table b1 490 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --jobs sd15:1 --algos loha --baselines floor
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records b8on b8off b8on2 xl4on xl4off xl4on2 b1
pack_out

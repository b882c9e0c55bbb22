#!/usr/bin/env bash
# Issue 7, session 43, after run 305 (LYCO_SIDE_SMS=32: SDXL b1 LoRA 67.95 → 67.2 ms, SD1.5 b1 LoRA −0.1, LoCon −0.16):
# the many-wave sizes where the side branch may outlast the frozen one (SDXL b4 LoRA, SD1.5 b8 LoRA and LoCon at
# 32 / 0 / 32, the floor in the first leg), SDXL b1 LoRA at 48 and 64, and 32 with LYCO_BLAS_CARVEOUT=16.
#   OUT=$OUT bash benchmarks/run_sidesms43b.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
(export LYCO_SIDE_SMS=32; step_table xl4on 70 $A --jobs sdxl:4 --algos lora --baselines floor)
(export LYCO_SIDE_SMS=0; step_table xl4off 110 $A --jobs sdxl:4 --algos lora --no-baselines)
(export LYCO_SIDE_SMS=32; step_table xl4on2 150 $A --jobs sdxl:4 --algos lora --no-baselines)
(export LYCO_SIDE_SMS=32; step_table b8on 205 $A --jobs sd15:8 --algos lora,locon --baselines floor)
(export LYCO_SIDE_SMS=0; step_table b8off 250 $A --jobs sd15:8 --algos lora,locon --no-baselines)
(export LYCO_SIDE_SMS=32; step_table b8on2 295 $A --jobs sd15:8 --algos lora,locon --no-baselines)
(export LYCO_SIDE_SMS=48; step_table xl48 340 $A --jobs sdxl:1 --algos lora --baselines floor)
(export LYCO_SIDE_SMS=64; step_table xl64 370 $A --jobs sdxl:1 --algos lora --no-baselines)
(export LYCO_SIDE_SMS=32; step_table xl32 400 $A --jobs sdxl:1 --algos lora --no-baselines)
(export LYCO_SIDE_SMS=32 LYCO_BLAS_CARVEOUT=16; step_table xl32c 430 $A --jobs sdxl:1 --algos lora --no-baselines)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records xl4on xl4off xl4on2 b8on b8off b8on2 xl48 xl64 xl32 xl32c
pack_out

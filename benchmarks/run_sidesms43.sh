#!/usr/bin/env bash
# Issue 7, session 43: LYCO_SIDE_SMS (experiment in lowrank._side_sms) — the side streams' cuBLAS GEMMs chosen for n
# SMs during the capture, so that their thin products take fewer SMs beside the frozen GEMMs (run 300: SDXL b1's
# frozen 1280² GEMMs 8.1 µs in the floor's step, 12.0 in LoRA's). SDXL b1 LoRA at 0 / 32 / 16 / 0 / 32, SD1.5 b1
# LoRA and LoCon at 32 / 0 / 32 (the floor in the first leg of each).
#   OUT=$OUT bash benchmarks/run_sidesms43.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
(export LYCO_SIDE_SMS=0; step_table xl0 75 $A --jobs sdxl:1 --algos lora --baselines floor)
(export LYCO_SIDE_SMS=32; step_table xl32 115 $A --jobs sdxl:1 --algos lora --no-baselines)
(export LYCO_SIDE_SMS=16; step_table xl16 155 $A --jobs sdxl:1 --algos lora --no-baselines)
(export LYCO_SIDE_SMS=0; step_table xl0b 195 $A --jobs sdxl:1 --algos lora --no-baselines)
(export LYCO_SIDE_SMS=32; step_table xl32b 235 $A --jobs sdxl:1 --algos lora --no-baselines)
(export LYCO_SIDE_SMS=32; step_table b1on 320 $A --jobs sd15:1 --algos lora,locon --baselines floor)
(export LYCO_SIDE_SMS=0; step_table b1off 380 $A --jobs sd15:1 --algos lora,locon --no-baselines)
(export LYCO_SIDE_SMS=32; step_table b1on2 440 $A --jobs sd15:1 --algos lora,locon --no-baselines)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records xl0 xl32 xl16 xl0b xl32b b1on b1off b1on2
pack_out

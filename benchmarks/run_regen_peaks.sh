#!/usr/bin/env bash
# Issue 7 GPU run 179 (session 25): the graph column's peak from after the eager sync-check step (train_step.py: the
# check step runs lyco's eager paths and bounded lyco's graph peak from below in run 178), LYCO_INPUT_REGEN on/off
# with PEFT and the floor in the same run, and what is live at the peak of lyco's captured step with it on.
# (runs 178–183 printed a subset of step_records' fields with a loop of their own)
#   OUT=$OUT bash benchmarks/run_regen_peaks.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table x4 110 --jobs sdxl:4 --algos lora --baselines floor --variants lyco,peft --memory-peak lora/lyco,lora/peft $A
(export LYCO_INPUT_REGEN=0; step_table x4_off 150 --jobs sdxl:4 --algos lora --no-baselines --variants lyco $A)
step_table s8 240 --jobs sd15:8 --algos lora,locon --baselines floor --variants lyco,peft $A
(export LYCO_INPUT_REGEN=0; step_table s8_off 280 --jobs sd15:8 --algos lora,locon --no-baselines --variants lyco $A)
step_table x1 350 --jobs sdxl:1 --algos lora --baselines floor --variants lyco,peft $A
(export LYCO_INPUT_REGEN=0; step_table x1_off 390 --jobs sdxl:1 --algos lora --no-baselines --variants lyco $A)
step_records x4 x4_off s8 s8_off x1 x1_off
python3 benchmarks/memory_peak.py $OUT/x4/memory_peak_sdxl_b4_lora_lyco.json $OUT/x4/memory_peak_sdxl_b4_lora_peft.json 2>&1 | cut -c1-160 | head -50
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 177 (session 24): what is live at the captured step's peak (memory_peak.py: the allocator's history
# over the graph phase, the peak's blocks by allocation site) for LoRA, lyco and PEFT, at SDXL b4 and SD1.5 b8 — where
# lyco's captured-step peak is over PEFT's (runs 174-175); then the trainer's graphs against eager for loha if time
# is left (run 176's check did not reach it).
#   OUT=$OUT bash benchmarks/run_memory_peak.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 10 --no-baselines --variants lyco,peft --memory-peak all"
step_table x4 120 --jobs sdxl:4 --algos lora $A
step_table s8 200 --jobs sd15:8 --algos lora $A
for f in x4/memory_peak_sdxl_b4_lora s8/memory_peak_sd15_b8_lora; do
  python3 benchmarks/memory_peak.py $OUT/${f}_lyco.json $OUT/${f}_peft.json 2>&1 | cut -c1-160
done
if [ $(( $(date +%s) - S )) -lt 250 ]; then graph_check 70 loha; fi
pack_out

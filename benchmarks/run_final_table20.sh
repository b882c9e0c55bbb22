#!/usr/bin/env bash
# Issue 7 GPU run 155: the whole SD1.5 b8 table at session 20's last code change (every algorithm; lyco as mode
# "auto" picks, PEFT and LyCORIS eager where they implement it — LyCORIS skipped where runs 19-79 found it ≥ 40 %
# slower and not lighter than PEFT, as run_table.sh), graph columns and peaks; eager medians over few steps (the
# README keeps run 79's eager columns). Needs the toml wheel among the carried ones (LyCORIS imports it).
#   OUT=$OUT bash benchmarks/run_final_table20.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
step_table . 560 --models sd15 --batches 8 --algos lora,locon,loha,lokr,lokr-full,dora,oft,glora,ia3,full,boft \
  --variants lyco,peft,lycoris-eager \
  --skip lora/lycoris-eager,locon/lycoris-eager,lokr/lycoris-eager,lokr-full/lycoris-eager,oft/lycoris-eager \
  --rounds 1 --steps 4 --warmup 2 --graph --graph-steps 15
grep "÷best peer" "$OUT/train_step.log" | grep graph | cut -c1-160

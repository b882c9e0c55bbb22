#!/usr/bin/env bash
# Issue 7 GPU run of session 37: the frozen k×k convs' weights stored channels-last (train_step.py --frozen-cl) at
# SD1.5 b1 — run 260's floor spent 6.21 of its 19.71 ms busy converting them to NHWC for cuDNN, forward and dgrad.
# Legs: the floor as before; the rule (weights that outsize the conv's input) with the floor, LoRA, LoCon and LoKr;
# every k×k weight (floor, LoRA); the whole model channels-last (floor).
#   OUT=$OUT bash benchmarks/run_cl37.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
step_table off 110 $A --baselines floor --algos lora
step_table rule 260 $A --baselines floor --algos lora,locon,lokr --frozen-cl rule --graph-trace floor/floor
step_table all 340 $A --baselines floor --algos lora --frozen-cl all
step_table model 400 $A --baselines floor --algos lora --frozen-cl model
gzip "$OUT"/*/graph_trace_*.json
grep -h "channels-last" $OUT/*/train_step.log
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records off rule all model
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 181 (session 25): the SD1.5 b8 rows not measured since session 24's fresh_memory and run 179's
# graph peak from after the check step — LoKr f8, LoKr full-matrix, DoRA, Diag-OFT, (IA)³ with PEFT, GLoRA and Full
# with LyCORIS (eager and Triton backends), the floor alongside.
# (runs 178–183 printed a subset of step_records' fields with a loop of their own)
#   OUT=$OUT bash benchmarks/run_table_peaks.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table p 300 --jobs sd15:8 --algos lokr,lokr-full,dora,oft,ia3 --baselines floor --variants lyco,peft $A
step_table l 470 --jobs sd15:8 --algos glora,full --no-baselines --variants lyco,lycoris-eager,lycoris-triton $A
step_records p l
pack_out

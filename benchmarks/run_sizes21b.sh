#!/usr/bin/env bash
# Issue 7 GPU run 161 (session 21): (1) the fused GEMM's wider rule (lowrank._FUSED_ROWS/_IN: ≥ 1024 rows, ≤ 2560
# inputs, from run 160's shape timings) as an A/B/A — LoRA as graphs at SD1.5 b8, SD1.5 b1 and SDXL b1: this code / the
# previous lowrank.py swapped in / this code; (2) the SDXL b4 1024 px table (floor; lyco and PEFT; LyCORIS left out:
# run 160 spent 140 s on one LyCORIS SDXL config), graph columns and peaks, until the deadline. Before the run:
#   mkdir -p benchmarks/.prev && git show HEAD:src/lyco/algorithms/lowrank.py > benchmarks/.prev/lowrank.py
#   OUT=$OUT bash benchmarks/run_sizes21b.sh      (carry .whl and benchmarks/.prev)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:8,sd15:1,sdxl:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --algos lora --variants lyco"
D=src/lyco/algorithms
step_table on 80 $A --baselines floor
cp $D/lowrank.py /tmp/lowrank_new.py && cp benchmarks/.prev/lowrank.py $D/lowrank.py
step_table off 140 $A --no-baselines
cp /tmp/lowrank_new.py $D/lowrank.py
step_table on2 200 $A --no-baselines
step_table sdxlb4 575 --jobs sdxl:4 --baselines floor --algos lora,locon,loha,lokr,dora,ia3,oft,glora,full,lokr-full \
  --variants lyco,peft --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 12
grep "÷best peer" "$OUT/sdxlb4/train_step.log" | grep graph | cut -c1-160
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 167 (session 22): change 110, the wide linear layers' forward concatenations only where
# rows·(out − in − r) > out·(in + r) (lowrank._cat_forward_pays; run 165's timeline: the copy of [W | s·U] 18.8 µs per
# GEGLU projection at SDXL b1), A/B/A against the previous lowrank.py (change 109's, swapped in): SDXL b1, SD1.5 b8
# (its 8×8 level's 512 rows), SD1.5 b1 (its 16×16 level's 256); with change 109's LoKr, GLoRA and (IA)³ at SD1.5 b1
# (run 166 did not reach them). Before the run:
#   mkdir -p benchmarks/.prev && git show HEAD:src/lyco/algorithms/lowrank.py > benchmarks/.prev/lowrank.py
#   OUT=$OUT bash benchmarks/run_cat_rows.sh      (carry .whl and benchmarks/.prev)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
D=src/lyco/algorithms
cp $D/lowrank.py /tmp/lowrank_new.py
old() { cp benchmarks/.prev/lowrank.py $D/lowrank.py; }
new() { cp /tmp/lowrank_new.py $D/lowrank.py; }
step_table x1_new 120 --jobs sdxl:1 --algos lora,locon,loha --baselines floor $A
old; step_table x1_old 175 --jobs sdxl:1 --algos lora,locon --no-baselines $A
new; step_table x1_new2 205 --jobs sdxl:1 --algos lora --no-baselines $A
step_table s8_new 235 --jobs sd15:8 --algos lora --no-baselines $A
old; step_table s8_old 265 --jobs sd15:8 --algos lora --no-baselines $A
new; step_table s8_new2 290 --jobs sd15:8 --algos lora --no-baselines $A
step_table s1_new 330 --jobs sd15:1 --algos lora,lokr,glora,ia3 --baselines floor $A
old; step_table s1_old 350 --jobs sd15:1 --algos lora --no-baselines $A
new
pack_out

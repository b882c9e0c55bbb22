#!/usr/bin/env bash
# Issue 7 GPU run 258 (session 35): a grouped linear layer's ∂x without its merged weight where the rows do not pay
# for it (change 147: LoKr's kron(I, B) downs; LYCO_MERGED_ROWS=0 turns every split off — LoKr has no other) —
# SD1.5 b1 LoKr on / off / on, the trainer's graphs against eager, SDXL b1 (≈ 5 min).
#   OUT=$OUT bash benchmarks/run_grouped_split35.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
step_table on 100 $A --jobs sd15:1 --baselines floor --algos lokr
LYCO_MERGED_ROWS=0 step_table off 135 $A --jobs sd15:1 --no-baselines --algos lokr
step_table on2 170 $A --jobs sd15:1 --no-baselines --algos lokr
graph_check 75 lokr,lokr-lowrank
step_table xl 300 $A --jobs sdxl:1 --no-baselines --algos lokr
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2 xl
pack_out

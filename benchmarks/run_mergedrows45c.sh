#!/usr/bin/env bash
# Issue 7, session 44, change 170 as built (lowrank._MERGED_ROWS = 0.75, no setting): the trainer's graphs against
# eager (lora, locon, lokr, loha), then SDXL b1 floor, LoRA and LoCon at the default.
#   OUT=$OUT bash benchmarks/run_mergedrows45c.sh      (carry .whl; ≈ 260 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 150 lora,locon,lokr,loha
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
step_table xl 265 $A --jobs sdxl:1 --algos lora,locon --baselines floor
echo "lyco warnings: $(cat $OUT/*/train_step.log $OUT/check_cuda_graph.log | grep -c 'RuntimeWarning: lyco')"
step_records xl
pack_out

#!/usr/bin/env bash
# Issue 7, session 44, after run 312 (SDXL b1 LoRA 67.17 at LYCO_MERGED_ROWS=1, 66.44 / 66.44 at 0.75, 67.25 at 2,
# 68.10 at inf; SDXL b4 170.76 / 170.63): the other configurations 0.75 changes — SD1.5 b8 (its cross-attention
# k/v forward: 616 rows, 768 inputs) LoRA and LoCon, SDXL b1 LoKr and LoCon — at 1 and 0.75, and SDXL b1 LoRA at 0.15
# (run 312's leg missed its deadline).
#   OUT=$OUT bash benchmarks/run_mergedrows45b.sh      (carry .whl; ≈ 300 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
(export LYCO_MERGED_ROWS=1; step_table b8c1 60 $A --jobs sd15:8 --algos lora,locon --baselines floor)
(export LYCO_MERGED_ROWS=0.75; step_table b8c075 105 $A --jobs sd15:8 --algos lora,locon --no-baselines)
(export LYCO_MERGED_ROWS=0.75; step_table xlc075 200 $A --jobs sdxl:1 --algos lokr,locon --baselines floor)
(export LYCO_MERGED_ROWS=1; step_table xlc1 270 $A --jobs sdxl:1 --algos lokr,locon --no-baselines)
(export LYCO_MERGED_ROWS=0.15; step_table xlc015 305 $A --jobs sdxl:1 --algos lora --no-baselines)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records b8c1 b8c075 xlc075 xlc1 xlc015
pack_out

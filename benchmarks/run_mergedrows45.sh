#!/usr/bin/env bash
# Issue 7, session 44: LYCO_MERGED_ROWS (lowrank._merged_pays: a linear layer's forward / ∂x through W′ where rows ≥
# c·in / c·out; c = 1 by default since run 238, H100, which measured only 0 and 1) at SDXL b1 LoRA, where its
# layers sit on both sides of 1: the 1280-channel level's 1024 rows against 1280 inputs (0.8), ff.net.2's 5120
# (0.2), the 640-channel level's GEGLU ∂x (4096 rows, 5120 outputs: 0.8), its ff.net.2 forward (1.6).
# c = 1 / 0.75 / 0.15 / 2 / inf / 1 / 0.75 (floor in the first leg), then SDXL b4 LoRA at 1 and 0.75 (its
# ff.net.2 at 0.8 switches). SD1.5 b1's layers do not change between 0.55 and 1 (its q/k/v groups' ∂x at the
# 640-channel level: 0.53); SD1.5 b8's cross-attention k/v forward (616 rows, 768 inputs) does (run 313).
#   OUT=$OUT bash benchmarks/run_mergedrows45.sh      (carry .whl; ≈ 330 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lora"
(export LYCO_MERGED_ROWS=1; step_table c1 75 $A --jobs sdxl:1 --baselines floor)
(export LYCO_MERGED_ROWS=0.75; step_table c075 110 $A --jobs sdxl:1 --no-baselines)
(export LYCO_MERGED_ROWS=0.15; step_table c015 145 $A --jobs sdxl:1 --no-baselines)
(export LYCO_MERGED_ROWS=2; step_table c2 180 $A --jobs sdxl:1 --no-baselines)
(export LYCO_MERGED_ROWS=inf; step_table cinf 215 $A --jobs sdxl:1 --no-baselines)
(export LYCO_MERGED_ROWS=1; step_table c1b 250 $A --jobs sdxl:1 --no-baselines)
(export LYCO_MERGED_ROWS=0.75; step_table c075b 285 $A --jobs sdxl:1 --no-baselines)
(export LYCO_MERGED_ROWS=1; step_table b4c1 335 $A --jobs sdxl:4 --no-baselines)
(export LYCO_MERGED_ROWS=0.75; step_table b4c075 385 $A --jobs sdxl:4 --no-baselines)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records c1 c075 c015 c2 cinf c1b c075b b4c1 b4c075
pack_out

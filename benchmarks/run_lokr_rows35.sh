#!/usr/bin/env bash
# Issue 7 GPU run 256 (session 35): LoKr's rebuilt op only on inputs of ≥ 16384 rows (LYCO_LOKR_REBUILD_ROWS,
# change 145) — SD1.5 b1 (with LoCon's ∂D taps by one gather, change 146), SD1.5 b8 on / off (0: the width rule
# alone), SDXL b1 on / off / 32768; the trainer's graphs against eager for lokr and locon (≈ 7 min).
#   OUT=$OUT bash benchmarks/run_lokr_rows35.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
step_table b1 100 $A --jobs sd15:1 --baselines floor --algos lokr,locon
step_table b8 150 $A --jobs sd15:8 --no-baselines --algos lokr
LYCO_LOKR_REBUILD_ROWS=0 step_table b8_off 195 $A --jobs sd15:8 --no-baselines --algos lokr
step_table xl 260 $A --jobs sdxl:1 --no-baselines --algos lokr
LYCO_LOKR_REBUILD_ROWS=0 step_table xl_off 320 $A --jobs sdxl:1 --no-baselines --algos lokr
LYCO_LOKR_REBUILD_ROWS=32768 step_table xl_32k 380 $A --jobs sdxl:1 --no-baselines --algos lokr
graph_check 80 lokr,lokr-lowrank,locon
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records b1 b8 b8_off xl xl_off xl_32k
pack_out

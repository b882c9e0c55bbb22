#!/usr/bin/env bash
# Issue 7 GPU run 252 (session 34): the rebuilt op's side-stream backward (change 144, LYCO_REBUILD_STREAMS) at the
# larger sizes — SD1.5 b8 LoKr and Full on / off, SDXL b1 LoKr on / off (≈ 5 min).
#   OUT=$OUT bash benchmarks/run_rebuild_streams34b.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco --no-baselines"
step_table b8 110 --jobs sd15:8 --algos lokr,full $A
LYCO_REBUILD_STREAMS=0 step_table b8_off 170 --jobs sd15:8 --algos lokr,full $A
step_table xl 225 --jobs sdxl:1 --algos lokr $A
LYCO_REBUILD_STREAMS=0 step_table xl_off 280 --jobs sdxl:1 --algos lokr $A
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records b8 b8_off xl xl_off
pack_out

#!/usr/bin/env bash
# Issue 7, prepared in session 47, not run: run 333 had FA+BA lose on lokr-full,
# and run 335 took its SDXL b4 leg: LoKr f8 with changes 178–179 (its rebuilt-op layers in the
# same build-ahead order as its bypass ops' merged weights) — SDXL b1 off (floor alongside) / FA+BA / off, SD1.5 b8
# off / FA+BA; then SDXL b4 lokr-full as built / change 177's rule off (D0: the leg run 332 missed).
#   OUT=$OUT bash benchmarks/run_ahead50b.sh      (carry .whl; ≈ 330 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
FB="LYCO_REBUILD_FORWARD_AHEAD=1 LYCO_REBUILD_BACKWARD_AHEAD=1"
step_table k1 110 $A --algos lokr --jobs sdxl:1 --baselines floor
(export $FB; step_table k1fb 150 $A --algos lokr --jobs sdxl:1 --no-baselines)
step_table k1o 190 $A --algos lokr --jobs sdxl:1 --no-baselines
step_table k8 220 $A --algos lokr --jobs sd15:8 --no-baselines
(export $FB; step_table k8fb 250 $A --algos lokr --jobs sd15:8 --no-baselines)
step_table x4 290 $A --algos lokr-full --jobs sdxl:4 --no-baselines
(export LYCO_LOKR_DIRECT_ROWS=0; step_table x4d 330 $A --algos lokr-full --jobs sdxl:4 --no-baselines)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records k1 k1fb k1o k8 k8fb x4 x4d
pack_out

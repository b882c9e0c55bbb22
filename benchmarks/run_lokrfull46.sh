#!/usr/bin/env bash
# Issue 7 GPU run 327 (session 46): LoKr with a full-matrix W2 against the floor at the four sizes (its floor ratios
# were last measured on the H100 in runs 219–221: SD1.5 b1 1.355, SDXL b1 1.623, SDXL b4 1.377; SD1.5 b8 1.26 in
# run 155), lyco only — its ratios to PEFT were 0.48–0.65 there.
#   OUT=$OUT bash benchmarks/run_lokrfull46.sh      (carry .whl; ≈ 260 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr-full --baselines floor"
step_table s1 60 $A --jobs sd15:1
step_table x1 150 $A --jobs sdxl:1
step_table s8 200 $A --jobs sd15:8
step_table x4 270 $A --jobs sdxl:4
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records s1 x1 s8 x4
pack_out

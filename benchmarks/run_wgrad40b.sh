#!/usr/bin/env bash
# Issue 7 GPU run of session 40, second: LYCO_WGRAD_KERNEL with the 1×1 rule (a batch's 1×1 down — LoKr's grouped
# W2 — through the kernel: one launch for the batched GEMM and its sum). SD1.5 b1 LoKr on / off / on (the floor beside
# the first); then SD1.5 b8 and SDXL b1, LoCon and LoKr on / off (the rule's work bound there: no regression).
#   OUT=$OUT bash benchmarks/run_wgrad40b.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
aba LYCO_WGRAD_KERNEL 110 150 190 --jobs sd15:1 $A --algos lokr
step_table b8on 260 --jobs sd15:8 $A --algos locon,lokr --no-baselines
(export LYCO_WGRAD_KERNEL=0; step_table b8off 330 --jobs sd15:8 $A --algos locon,lokr --no-baselines)
step_table xlon 400 --jobs sdxl:1 $A --algos locon,lokr --no-baselines
(export LYCO_WGRAD_KERNEL=0; step_table xloff 470 --jobs sdxl:1 $A --algos locon,lokr --no-baselines)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2 b8on b8off xlon xloff
pack_out

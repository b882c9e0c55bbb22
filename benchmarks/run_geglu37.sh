#!/usr/bin/env bash
# Issue 7 GPU run of session 36: LoKr's grouped ff.net.2 taking the GEGLU's fused backward (∂p by the kernel, ∂D from
# the kept x) — an A/B/A against LYCO_GEGLU_FUSE=0 (which LoKr had no other use for) at SD1.5 b1, then on/off at
# SD1.5 b8 and SDXL b1; LoCon at SD1.5 b1 with the conv ∂D's taps reordered by one flip (no switch: against run 260).
#   OUT=$OUT bash benchmarks/run_geglu37.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
step_table b1 150 $A --jobs sd15:1 --baselines floor --algos locon,lokr
(export LYCO_GEGLU_FUSE=0; step_table off 200 $A --jobs sd15:1 --no-baselines --algos lokr)
step_table on2 250 $A --jobs sd15:1 --no-baselines --algos lokr
step_table b8 320 $A --jobs sd15:8 --no-baselines --algos lokr
(export LYCO_GEGLU_FUSE=0; step_table b8off 380 $A --jobs sd15:8 --no-baselines --algos lokr)
step_table xl1 440 $A --jobs sdxl:1 --no-baselines --algos lokr
(export LYCO_GEGLU_FUSE=0; step_table xl1off 500 $A --jobs sdxl:1 --no-baselines --algos lokr)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records b1 off on2 b8 b8off xl1 xl1off
pack_out

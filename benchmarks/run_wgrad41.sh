#!/usr/bin/env bash
# Issue 7, prepared in session 40 for the next: the final wgrad_triton.form (change 164's bounds: MAX_POSITIONS 2560,
# the work bound 2.0e7 — not measured in a step) A/B'd in one run. SD1.5 b1 LoKr, LoCon and LoHa on / off / on (the
# floor beside the first), then SD1.5 b8 LoKr and LoCon on / off (run 289 before the bounds: LoKr +0.66 ms there).
# SDXL b1 and the trainer's graphs: run_wgrad41b.sh.
#   OUT=$OUT bash benchmarks/run_wgrad41.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
aba LYCO_WGRAD_KERNEL 150 210 270 --jobs sd15:1 $A --algos lokr,locon,loha
step_table b8on 380 --jobs sd15:8 $A --algos lokr,locon --baselines floor
(export LYCO_WGRAD_KERNEL=0; step_table b8off 460 --jobs sd15:8 $A --algos lokr,locon --no-baselines)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2 b8on b8off
pack_out

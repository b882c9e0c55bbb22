#!/usr/bin/env bash
# Issue 7 GPU run 227 (session 30): (IA)³'s grouped op scaling its output where the bytes pay for its extra launches
# (ia3._group_scales, change 131: a cross-attention's k and v on 77 or 308 text rows) — SDXL b1 with every (IA)³ path
# forced (eager too: the float64 gradient check) beside PEFT, off (LYCO_IA3_LAUNCH_BYTES huge), on again; SDXL b4 on,
# off.
# Not kept (no gain: NOTES change 131); the code is only in benchmarks/experiments/ia3_group_scale.patch (apply it to
# run this again).
#   OUT=$OUT bash benchmarks/run_ia3_group_scale.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
(export LYCO_IA3_SCALE_OUTPUT=1 LYCO_IA3_KEEP_OUTPUT=1 LYCO_SHARED_INPUT=1 LYCO_GEGLU_FUSE=1 LYCO_IA3_GEGLU_SUMS=1 \
   LYCO_IA3_ROWS_KERNEL=1
 step_table x1 120 --no-baselines --variants lyco,peft --jobs sdxl:1 --algos ia3 $A)
(export LYCO_IA3_LAUNCH_BYTES=1000000000000; step_table x1off 190 --no-baselines --variants lyco --jobs sdxl:1 --algos ia3 $A)
step_table x1on 250 --no-baselines --variants lyco --jobs sdxl:1 --algos ia3 $A
step_table x4 320 --no-baselines --variants lyco --jobs sdxl:4 --algos ia3 $A
(export LYCO_IA3_LAUNCH_BYTES=1000000000000; step_table x4off 400 --no-baselines --variants lyco --jobs sdxl:4 --algos ia3 $A)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
grep -h "RuntimeWarning: lyco" $OUT/*/train_step.log | sort | uniq -c | head
step_records x1 x1off x1on x4 x4off
pack_out

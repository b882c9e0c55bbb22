#!/usr/bin/env bash
# Issue 7 GPU run of session 39: change 161 (LYCO_ACC_CL) for the other delta-path algorithms — SD1.5 b1 LoHa on the
# frozen conv layout, on then off (the floor beside the first); the trainer's graphs against eager for loha,
# diag-oft and lokr-fp16 (check_cuda_graph sets the switch to 1 in both).
#   OUT=$OUT bash benchmarks/run_acc_cl39c.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --frozen-cl rule --variants lyco --algos loha"
step_table on 120 $A --baselines floor
(export LYCO_ACC_CL=0; step_table off 170 $A --no-baselines)
graph_check 200 loha,diag-oft,lokr-fp16
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off
pack_out

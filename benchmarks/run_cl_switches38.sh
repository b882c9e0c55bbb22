#!/usr/bin/env bash
# Issue 7 GPU run of session 38: on the frozen conv layout (--frozen-cl rule) the conv paths tuned on the layout as
# given may lose — LoCon and LoKr at SD1.5 b1 with each conv switch at 0 in turn, the defaults before and after; then
# the trainer's graphs against eager (lokr-full: run 275's failure was check_cuda_graph's eager runs without
# LYCO_MERGE_TAPS).
#   OUT=$OUT bash benchmarks/run_cl_switches38.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 100 lokr,lokr-full,locon
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --jobs sd15:1 --variants lyco --frozen-cl rule --algos locon,lokr"
step_table base 200 --baselines floor $A
t=200
for v in LYCO_CONV_NHWC LYCO_CONV_WEIGHT_CL LYCO_DGRAD_WEIGHT_CL LYCO_CONV_EPILOGUE; do
  t=$((t + 60))
  (export $v=0; step_table "off_$v" $t --no-baselines $A)
done
step_table base2 $((t + 60)) --no-baselines $A
for d in base off_LYCO_CONV_NHWC off_LYCO_CONV_WEIGHT_CL off_LYCO_DGRAD_WEIGHT_CL off_LYCO_CONV_EPILOGUE base2; do step_records "$d"; done
pack_out

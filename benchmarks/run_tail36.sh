#!/usr/bin/env bash
# Issue 7 GPU run of session 36: the batched factor products' backward on a tail stream under the trainer's grad sink
# (LYCO_FACTOR_TAIL, change 151) — SD1.5 b1 LoKr with the sink, A/B/A against LYCO_FACTOR_TAIL=0, LoHa with the sink
# on/off, the floor and LoKr without the sink beside; the trainer's graphs (the sink, so the tail) against eager.
#   OUT=$OUT bash benchmarks/run_tail36.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
step_table on 120 $A --baselines floor --algos lokr,loha --lyco-grad-sink
(export LYCO_FACTOR_TAIL=0; step_table off 170 $A --no-baselines --algos lokr,loha --lyco-grad-sink)
step_table on2 210 $A --no-baselines --algos lokr --lyco-grad-sink
step_table nosink 250 $A --no-baselines --algos lokr
graph_check 150 lokr,loha
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2 nosink
pack_out

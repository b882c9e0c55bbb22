#!/usr/bin/env bash
# Issue 7 GPU run of session 39: LYCO_ACC_CL (change 161) — a delta-path conv adapter's up into a channels-last frozen
# conv's output by batched GEMMs over the positions instead of a 1×1 conv whose weight gradient cuDNN ran as
# wgrad2d_grouped_direct_kernel (run 280: 15 × 50 µs in SD1.5 b1 LoKr's step on the frozen conv layout). SD1.5 b1
# LoKr and LoCon on the layout, on / off / on (the floor beside the first), LoKr's timeline; then the trainer's graphs
# against eager for lokr and locon (check_cuda_graph sets the switch to 1 in both).
#   OUT=$OUT bash benchmarks/run_acc_cl39.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --frozen-cl rule --variants lyco"
aba LYCO_ACC_CL 150 220 290 $A --algos lokr,locon --graph-trace lokr/lyco
graph_check 120 lokr,locon
gzip "$OUT"/*/graph_trace_*.json
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2
pack_out

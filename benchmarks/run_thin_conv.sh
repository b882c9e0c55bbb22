#!/usr/bin/env bash
# (The thin conv was taken out after this run — slower than cuDNN; NOTES change 98, kept as
# benchmarks/experiments/thin_conv.patch: LYCO_THIN_CONV no longer exists. LYCO_CONV_WEIGHT_CL was kept.)
# Issue 7 GPU run 142 (NOTES changes 97–98): a channels-last conv's weights by the tiled copy (LYCO_CONV_WEIGHT_CL)
# and a conv adapter's down by a Triton implicit GEMM whose N is the rank (LYCO_THIN_CONV). The kernel per shape
# against float64 and cuDNN, then SD1.5 b8 LoCon/LoHa as graphs: both on / weight copy off / thin conv off / both on
# (the floor alongside), then the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_thin_conv.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 150 python3 benchmarks/experiments/thin_conv_check.py > "$OUT/thin_conv_check.txt" 2>&1
echo "thin_conv_check rc=$?"; grep -v Warn "$OUT/thin_conv_check.txt" | cut -c1-200
ARGS="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --algos locon,loha --variants lyco"
step_table on 230 $ARGS --baselines floor
(export LYCO_CONV_WEIGHT_CL=0; step_table wcl_off 280 $ARGS --no-baselines)
(export LYCO_THIN_CONV=0; step_table thin_off 330 $ARGS --no-baselines)
step_table on2 380 $ARGS --no-baselines
graph_check 100 locon,loha
pack_out

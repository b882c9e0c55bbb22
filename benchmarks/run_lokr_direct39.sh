#!/usr/bin/env bash
# Issue 7 GPU run of session 39: which op launches cuDNN's wgrad2d_grouped_direct_kernel in SD1.5 b1 LoKr's step on
# the frozen conv layout — run 279: 17 launches, 0.85 ms, against 2 (0.10 ms) as given, where as given 15 more
# nvjet_sm90_tst_64x32 TNT GEMMs ran (LoKr's adapter time 7.24 ms on the layout against 6.44 as given). LoKr alone,
# on the layout and as given, with every launching op of those kernels.
#   OUT=$OUT bash benchmarks/run_lokr_direct39.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco --no-baselines --algos lokr"
M="wgrad2d_grouped_direct,nvjet_sm90_tst_64x32,nvjet_sm90_tss_64x32,reduce_wgrad_nchw,sm80_xmma_wgrad"
T="--graph-trace lokr/lyco --graph-makers $M --graph-makers-top 0"
step_table rule 200 $A --frozen-cl rule $T
step_table asis 330 $A $T
gzip "$OUT"/*/graph_trace_*.json
step_records rule asis
pack_out

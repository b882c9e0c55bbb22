#!/usr/bin/env bash
# Issue 7 GPU run of session 38: LoKr's grouped merge on a channels-last frozen weight walked by taps
# (lowrank_triton.add_lowrank_taps, LYCO_MERGE_TAPS) against the NCHW copy + addmm + cuDNN's conversion it replaces —
# on the frozen conv layout (--frozen-cl rule): SD1.5 b1 A/B/A with LoCon as a control and the makers of the layout
# conversions, SD1.5 b8 on / off, SDXL b1 on; the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_taps38.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
B="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco --frozen-cl rule"
A="--jobs sd15:1 $B"
M="elementwise_kernel<128,nchwToNhwc,nhwcToNchw,_taps_build_kernel,_build_kernel,CatArrayBatchedCopy"
step_table on 80 $A --baselines floor --algos lokr,locon --graph-trace lokr/lyco --graph-makers "$M"
(export LYCO_MERGE_TAPS=0; step_table off 130 $A --no-baselines --algos lokr --graph-trace lokr/lyco --graph-makers "$M")
step_table on2 160 $A --no-baselines --algos lokr
step_table b8 250 --jobs sd15:8 $B --baselines floor --algos lokr
(export LYCO_MERGE_TAPS=0; step_table b8off 290 --jobs sd15:8 $B --no-baselines --algos lokr)
step_table xl 420 --jobs sdxl:1 $B --baselines floor --algos lokr
graph_check 100 lokr,lokr-full
gzip "$OUT"/*/graph_trace_*.json
step_records on off on2 b8 b8off xl
pack_out

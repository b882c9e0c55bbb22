#!/usr/bin/env bash
# Issue 7 GPU run prepared in session 37 (not run yet): which ops launch the frozen step's extra elementwise kernels
# on the channels-last conv layout (run 267's rule floor at SD1.5 b1: `elementwise_kernel<128,4>` 614× 3.34 ms against
# 418× 2.42 in run 164's plain floor as given, across runs) — the floor's timeline and makers on the layout and as given, LoRA's on the layout.
#   OUT=$OUT bash benchmarks/run_floor_makers38.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
M="elementwise_kernel<128,nchwToNhwc,nhwcToNchw,vectorized_elementwise_kernel"
step_table rule 200 $A --baselines floor --algos lora --frozen-cl rule --graph-trace floor/floor,lora/lyco --graph-makers "$M"
step_table asis 330 $A --baselines floor --algos "" --graph-trace floor/floor --graph-makers "$M"
gzip "$OUT"/*/graph_trace_*.json
step_records rule asis
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run prepared in session 38 (not run): why LoKr's adapter time is ≈ 0.9 ms larger on the frozen conv
# layout than as given at SD1.5 b1 (run 275: 22.9 − 15.6 against run 262's 27.0 − 20.4, across runs; change 158's
# taps merge took 0.18 of it) — LoKr and the floor on the layout and as given in one run, traced, with every launching
# op of the conversion and elementwise kernels (--graph-makers-top 0). Compare with
#   python benchmarks/graph_trace.py rule/graph_trace_sd15_b1_lokr_lyco.json.gz rule/graph_trace_sd15_b1_floor_floor.json.gz
# and the same under asis/.
#   OUT=$OUT bash benchmarks/run_lokr_layout39.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco --baselines floor --algos lokr"
M="elementwise_kernel<128,nchwToNhwc,nhwcToNchw,_build_kernel,_taps_build_kernel,reduce_kernel,CatArrayBatchedCopy"
T="--graph-trace floor/floor,lokr/lyco --graph-makers $M --graph-makers-top 0"
step_table rule 200 $A --frozen-cl rule $T
step_table asis 400 $A $T
gzip "$OUT"/*/graph_trace_*.json
step_records rule asis
pack_out

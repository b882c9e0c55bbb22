#!/usr/bin/env bash
# Issue 7 GPU run prepared in session 35 (not run yet): which ops launch what is left over floor-geglu at SD1.5 b1 —
# floor-geglu's own makers (which `contiguous` copies are the floor's), LoCon's and LoKr's with four enclosing ops —
# then changes 147–148 at the sizes they were not measured at: LoKr SD1.5 b8 (79.63 ms in run 256 before them) and
# SDXL b4 (≈ 5.5 min: left out, as the 600 s limit would cut the run before pack_out).
#   OUT=$OUT bash benchmarks/run_makers36.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
M="elementwise_kernel<128,CatArrayBatchedCopy,reduce_kernel,_build_kernel,_copy3,nchwToNhwc,nhwcToNchw"
step_table b1 170 $A --jobs sd15:1 --baselines floor,floor-geglu --algos locon,lokr \
  --graph-trace floor-geglu,locon/lyco,lokr/lyco --graph-makers "$M"
step_table b8 220 $A --jobs sd15:8 --no-baselines --algos lokr
gzip "$OUT"/*/graph_trace_*.json
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records b1 b8
pack_out

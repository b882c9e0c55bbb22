#!/usr/bin/env bash
# Issue 7 GPU run prepared in session 36 (not run yet): change 149's final form (the conv ∂D's taps reordered by one
# aten.flip.out into a contiguous result; runs 261–265 had a strided first form) at SD1.5 b1 — the floor, LoCon and
# LoKr with their timelines and the flip's makers — then LoKr's trainer step (the grad sink, changes 151–152) beside.
#   OUT=$OUT bash benchmarks/run_flip37.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
M="elementwise_kernel<128,indexSelect,reduce_kernel,_build_kernel,CatArrayBatchedCopy"
step_table b1 170 $A --baselines floor --algos locon,lokr --graph-trace locon/lyco,lokr/lyco --graph-makers "$M"
step_table sink 220 $A --no-baselines --algos lokr --lyco-grad-sink
graph_check 150 locon,lokr
gzip "$OUT"/*/graph_trace_*.json
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records b1 sink
pack_out

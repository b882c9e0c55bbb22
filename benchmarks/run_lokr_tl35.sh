#!/usr/bin/env bash
# Issue 7 GPU run 257 (session 35): SD1.5 b1 LoKr's timeline after change 145 (every layer in the LoRA form at b1)
# with the ops that launch its kernels (--graph-makers); LoCon with change 146; the trainer's graphs against eager for
# locon (≈ 4 min).
#   OUT=$OUT bash benchmarks/run_lokr_tl35.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
M="_kron,CatArrayBatchedCopy,elementwise_kernel<128,reduce_kernel,nvjet,_build_kernel,splitKreduce,_copy3,_up_add"
step_table lokr 110 $A --baselines floor --algos lokr --graph-trace lokr/lyco --graph-makers "$M"
step_table locon 150 $A --no-baselines --algos locon
graph_check 100 locon
gzip "$OUT"/*/graph_trace_*.json
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records lokr locon
pack_out

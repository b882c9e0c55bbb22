#!/usr/bin/env bash
# Issue 7 GPU run 255 (session 35): LoKr's rebuilt-op width rule (LYCO_LOKR_WGRAD_PER_H, measured at SD1.5 b8 only)
# at SD1.5 b1 — default 2.656 / off / 2.0 — and which ops launch LoCon's and LoRA's kernels in the captured step's
# paths (--graph-makers, one eager step under graph_step; ≈ 5 min).
#   OUT=$OUT bash benchmarks/run_lokr_rule35.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
M="elementwise_kernel<128, 4,_build_kernel,_copy3_kernel,Memset,CatArrayBatchedCopy,splitKreduce,fprop_implicit,reduce_kernel"
step_table lokr 100 $A --baselines floor --algos lokr
LYCO_LOKR_WGRAD_PER_H=0 step_table lokr0 140 $A --no-baselines --algos lokr
LYCO_LOKR_WGRAD_PER_H=2.0 step_table lokr2 180 $A --no-baselines --algos lokr
step_table lokr_b 220 $A --no-baselines --algos lokr
step_table locon 290 $A --no-baselines --algos locon --graph-trace locon/lyco --graph-makers "$M"
step_table lora 350 $A --no-baselines --algos lora --graph-trace lora/lyco --graph-makers "$M"
gzip "$OUT"/*/graph_trace_*.json
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records lokr lokr0 lokr2 lokr_b locon lora
pack_out

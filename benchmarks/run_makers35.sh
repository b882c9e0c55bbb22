#!/usr/bin/env bash
# Issue 7 GPU run 254 (session 35): SD1.5 b1 timelines of LoKr, LoCon and floor-geglu (captured steps) and, from an
# eager step profiled with shapes and stacks, which ops launch the kernels the timelines name only (--profile-makers)
# for LoKr, LoCon and LoRA (≈ 6 min).
#   OUT=$OUT bash benchmarks/run_makers35.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco --profile-top 40"
M="CatArrayBatchedCopy,elementwise_kernel,reduce_kernel,splitKreduce,_kron,_build_kernel,_finish_kernel,_partial_kernel,memcpy,Memset"
step_table lokr 120 $A --baselines floor-geglu --algos lokr --graph-trace lokr/lyco,floor-geglu --profile lokr \
  --profile-makers $M
step_table locon 230 $A --no-baselines --algos locon --graph-trace locon/lyco --profile locon --profile-makers $M
step_table lora 300 $A --no-baselines --algos lora --profile lora --profile-makers $M
gzip "$OUT"/*/graph_trace_*.json
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records lokr locon lora
pack_out

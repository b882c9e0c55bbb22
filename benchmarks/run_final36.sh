#!/usr/bin/env bash
# Issue 7 GPU run of session 36 after changes 149–150: SD1.5 b1 floor, LoRA, LoCon, LoKr (LoKr's timeline and makers),
# the trainer's graphs against eager for lokr and locon, PEFT's LoRA at SD1.5 b1 (run 250's last).
#   OUT=$OUT bash benchmarks/run_final36.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
M="elementwise_kernel<128,CatArrayBatchedCopy,reduce_kernel,_build_kernel,_copy3,splitKreduce"
step_table t 160 $A --variants lyco --baselines floor --algos lora,locon,lokr --graph-trace lokr/lyco --graph-makers "$M"
graph_check 150 lokr,locon
step_table peft 380 $A --variants peft --no-baselines --algos lora
gzip "$OUT"/*/graph_trace_*.json
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records t peft
pack_out

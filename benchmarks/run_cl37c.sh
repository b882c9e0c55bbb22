#!/usr/bin/env bash
# Issue 7 GPU run of session 37 (third): a channels-last frozen conv weight's merge kept channels-last
# (lowrank._merged_cl) — SD1.5 b1 LoCon and LoKr on the layout (run 268 before it: floor 15.51, LoCon 20.17, LoKr
# 23.03), LoCon's kernel makers; SDXL b1 on the layout; the trainer's graphs against eager on it.
#   OUT=$OUT bash benchmarks/run_cl37c.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco --frozen-cl rule"
M="elementwise_kernel<128,nchwToNhwc,nhwcToNchw,_build_kernel,_copy3_kernel"
step_table b1 180 --jobs sd15:1 $A --baselines floor --algos locon,lokr --graph-trace locon/lyco --graph-makers "$M"
step_table xl 400 --jobs sdxl:1 $A --baselines floor --algos lora,lokr
graph_check 80 locon,lokr
gzip "$OUT"/*/graph_trace_*.json
grep -h "channels-last" $OUT/*/train_step.log
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records b1 xl
pack_out

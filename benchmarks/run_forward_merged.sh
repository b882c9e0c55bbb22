#!/usr/bin/env bash
# Issue 7 GPU run 235 (session 31): a linear layer's op forward through its merged weight built ahead on the up
# stream (change 133, LYCO_FORWARD_MERGED, lowrank._fwd_weights) — A/B/A at SD1.5 b1 LoRA beside PEFT and the floor,
# A/B at SD1.5 b8 and SDXL b1; the trainer's graphs against eager (check_cuda_graph sets it on).
#   OUT=$OUT bash benchmarks/run_forward_merged.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
J="--jobs sd15:1 --algos lora $A"
step_table on 110 --baselines floor --variants lyco,peft $J
(export LYCO_FORWARD_MERGED=0; step_table off 150 --no-baselines --variants lyco $J)
step_table on2 190 --no-baselines --variants lyco $J
step_table s8 260 --no-baselines --variants lyco --jobs sd15:8 --algos lora $A
(export LYCO_FORWARD_MERGED=0; step_table s8off 320 --no-baselines --variants lyco --jobs sd15:8 --algos lora $A)
step_table x1 390 --no-baselines --variants lyco --jobs sdxl:1 --algos lora $A
(export LYCO_FORWARD_MERGED=0; step_table x1off 460 --no-baselines --variants lyco --jobs sdxl:1 --algos lora $A)
graph_check 90 lora,lora-ckpt,lora-te
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2 s8 s8off x1 x1off
pack_out

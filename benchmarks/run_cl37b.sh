#!/usr/bin/env bash
# Issue 7 GPU run of session 37 (second): the frozen k×k conv weights channels-last by lyco's own rule
# (lyco.models.layout, what `lyco train` now does by default on a GPU; train_step.py --frozen-cl rule) — SD1.5 b1
# with PEFT's LoRA on the same layout beside lyco's, PEFT without it, SD1.5 b8; then the trainer's graphs against
# eager with the layout on (check_cuda_graph's tiny SD1 runs bf16 on CUDA, where "auto" applies it).
#   OUT=$OUT bash benchmarks/run_cl37b.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table rule 230 --jobs sd15:1 $A --baselines floor --variants lyco,peft --algos lora,locon,lokr --skip locon/peft,lokr/peft --frozen-cl rule
step_table off 300 --jobs sd15:1 $A --baselines floor --variants peft --algos lora
step_table rule8 440 --jobs sd15:8 $A --baselines floor --variants lyco --algos lora,lokr --frozen-cl rule
graph_check 90 lora,locon,lokr
grep -h "channels-last" $OUT/*/train_step.log
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records rule off rule8
pack_out

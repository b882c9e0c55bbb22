#!/usr/bin/env bash
# Issue 7 GPU run 236 (session 31): change 133 again — run 235 (run_forward_merged.sh) measured it off everywhere: its
# switch asked for torch.is_grad_enabled() inside the op's forward, where autograd does not record. A/B/A at SD1.5 b1
# LoRA beside PEFT and the floor, A/B at SD1.5 b8; the trainer's graphs against eager with it on.
#   OUT=$OUT bash benchmarks/run_forward_merged2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
J="--jobs sd15:1 --algos lora $A"
step_table on 110 --baselines floor --variants lyco,peft $J
(export LYCO_FORWARD_MERGED=0; step_table off 140 --no-baselines --variants lyco $J)
step_table on2 170 --no-baselines --variants lyco $J
step_table s8 205 --no-baselines --variants lyco --jobs sd15:8 --algos lora $A
(export LYCO_FORWARD_MERGED=0; step_table s8off 240 --no-baselines --variants lyco --jobs sd15:8 --algos lora $A)
graph_check 60 lora
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2 s8 s8off
pack_out

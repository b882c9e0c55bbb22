#!/usr/bin/env bash
# Issue 7 GPU run 242 (session 33): the norm-regen size rule (regen.norm_regen_min, LYCO_NORM_REGEN_MIN, default 2^21
# elements: SD1.5 b1 keeps its norms' outputs, SDXL b1 regenerates its 64x64 level's only) against every size
# regenerated (MIN=0, the rule before), A/B/A/B at SD1.5 b1 LoRA beside PEFT and the floor, A/B/A at SDXL b1 beside the
# floor; the trainer's step (--lyco-grad-sink) with the late join now on in captured steps; SD1.5 b8's peak under the
# rule; the trainer's graphs against eager (≈ 8 min).
#   OUT=$OUT bash benchmarks/run_norm_min.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --algos lora"
J="$A --jobs sd15:1"
step_table plain 95 --baselines floor --variants lyco,peft $J
(export LYCO_NORM_REGEN_MIN=0; step_table m0 125 --no-baselines --variants lyco $J)
step_table plain2 155 --no-baselines --variants lyco $J
(export LYCO_NORM_REGEN_MIN=0; step_table m0b 185 --no-baselines --variants lyco $J)
step_table x1 250 --baselines floor --variants lyco $A --jobs sdxl:1
(export LYCO_NORM_REGEN_MIN=0; step_table x1m0 300 --no-baselines --variants lyco $A --jobs sdxl:1)
step_table x1b 350 --no-baselines --variants lyco $A --jobs sdxl:1
step_table sink 385 --no-baselines --variants lyco $J --lyco-grad-sink
step_table s8 425 --no-baselines --variants lyco $A --jobs sd15:8
graph_check 60 lora
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records plain m0 plain2 m0b x1 x1m0 x1b sink s8
pack_out

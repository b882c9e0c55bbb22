#!/usr/bin/env bash
# Issue 7 GPU run 245 (session 33): change 138 — the factor gradients no GEMM adds into .grad (convs', the shared-input
# groups' downs) added by the ops on their side streams (lowrank._sink_add), not by autograd's accumulation on the
# current stream (run 243's timeline of the trainer's step: 144 add kernels, 0.20 ms exposed + 0.08 idle). SD1.5 b1
# LoRA, the step as benchmarked (gradients returned) beside PEFT and the floor, then as the trainer's
# (--lyco-grad-sink), A/B twice; LoCon the same; the trainer's graphs against eager (lora, locon) (≈ 6 min).
#   OUT=$OUT bash benchmarks/run_sink_adds.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
J="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --jobs sd15:1"
step_table plain 95 --baselines floor --variants lyco,peft $J --algos lora
step_table sink 125 --no-baselines --variants lyco $J --algos lora --lyco-grad-sink
step_table plain2 155 --no-baselines --variants lyco $J --algos lora
step_table sink2 185 --no-baselines --variants lyco $J --algos lora --lyco-grad-sink
step_table lcplain 220 --no-baselines --variants lyco $J --algos locon
step_table lcsink 255 --no-baselines --variants lyco $J --algos locon --lyco-grad-sink
graph_check 120 lora,locon
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records plain sink plain2 sink2 lcplain lcsink
pack_out

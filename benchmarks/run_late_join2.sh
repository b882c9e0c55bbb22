#!/usr/bin/env bash
# Issue 7 GPU run 241 (session 32): run 240 measured change 135 (LYCO_LATE_JOIN) where it cannot act — the benchmark's
# step returns the factor gradients to autograd, so every side stream is joined. Here lyco's captured step as its
# trainer's (train_step --lyco-grad-sink: the gradients added into kept .grad tensors by the ops): SD1.5 b1 LoRA
# without the sink (beside PEFT and the floor), with it and the late join, with it and without the late join, again;
# then LYCO_NORM_REGEN=0 (no sink), GLoRA at change 134's default, the trainer's graphs against eager (≈ 5 min).
# Not run yet: run 241's machine start took the session's last device time.
#   OUT=$OUT bash benchmarks/run_late_join2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
J="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --jobs sd15:1 --algos lora"
step_table plain 95 --baselines floor --variants lyco,peft $J
step_table sink 125 --no-baselines --variants lyco $J --lyco-grad-sink
(export LYCO_LATE_JOIN=0; step_table sinkoff 155 --no-baselines --variants lyco $J --lyco-grad-sink)
step_table sink2 185 --no-baselines --variants lyco $J --lyco-grad-sink
# the norm-regenerated inputs' ∂D kernels at b1 (0.30 ms exposed in run 239's timeline; the peak has room there)
(export LYCO_NORM_REGEN=0; step_table noreg 215 --no-baselines --variants lyco $J)
# change 134 on GLoRA (run 239 skipped c = 1 at its deadline; c = 0 was 26.15 ms there)
step_table glora 250 --no-baselines --variants lyco --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 \
  --jobs sd15:1 --algos glora
graph_check 60 lora
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records plain sink sinkoff sink2 noreg glora
pack_out

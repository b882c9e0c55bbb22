#!/usr/bin/env bash
# Issue 7 GPU run 205 (session 27): (IA)³ after run 204 found 5 of SD1.5's 16 GEGLUs unfused (their projections on the
# rebuilt op returned a view of a tensor autograd never saw; the op now runs on rows) — SD1.5 b8 (IA)³ with the floor
# and PEFT, LYCO_GEGLU_FUSE=0; the trainer's graphs against eager (ia3).
#   OUT=$OUT bash benchmarks/run_geglu_ia3b.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 100 ia3
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --jobs sd15:8 --algos ia3"
step_table s8 300 --baselines floor --variants lyco,peft $A
(export LYCO_GEGLU_FUSE=0; step_table s8_off 330 --no-baselines --variants lyco $A)
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records s8 s8_off
pack_out

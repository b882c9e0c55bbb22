#!/usr/bin/env bash
# Issue 7, session 49 (run 343): the trainer's graphs against eager for LoKr f8 and lokr-full with change 183's
# default (32 programs at least, run 342) — run 341's check ran out of time after lokr-full, before lokr.
#   OUT=$OUT bash benchmarks/run_check58.sh      (carry .whl; ≈ 120 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 150 lokr,lokr-full
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 158: run 157 left LoKr f8 with one leg of LYCO_DGRAD_WEIGHT_CL on (81.86 against 81.49 off); its
# A/B/A alone.
#   OUT=$OUT bash benchmarks/run_dgrad_cl2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
aba LYCO_DGRAD_WEIGHT_CL 45 75 105 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph \
  --graph-steps 20 --algos lokr --variants lyco
pack_out

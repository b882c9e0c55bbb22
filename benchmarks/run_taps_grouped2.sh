#!/usr/bin/env bash
# Issue 7 GPU run 147 (NOTES change 100, its shape rule): LoKr's grouped downs by the taps form only where z's row
# (groups·k²·r) is at most twice x's channels (run 146: at 320 channels it lost). SD1.5 b8 LoKr as graphs, A/B/A
# against LYCO_TAPS_DOWN=0, the floor alongside.
#   OUT=$OUT bash benchmarks/run_taps_grouped2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
aba LYCO_TAPS_DOWN 80 120 160 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 \
  --algos lokr --variants lyco
pack_out

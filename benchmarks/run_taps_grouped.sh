#!/usr/bin/env bash
# Issue 7 GPU run 146 (NOTES change 100): LoKr's grouped conv down by the taps form too (one GEMM with the channel
# groups as rows, one tap sum). The path per shape against float64 and cuDNN, then SD1.5 b8 LoKr (and LoCon) as
# graphs, A/B/A against LYCO_TAPS_DOWN=0 (the floor alongside), then the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_taps_grouped.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 150 python3 benchmarks/experiments/taps_down_check.py > "$OUT/taps_down_check.txt" 2>&1
echo "taps_down_check rc=$?"; grep -v Warn "$OUT/taps_down_check.txt" | grep -E "grouped|summed|worst|refused" | cut -c1-200
aba LYCO_TAPS_DOWN 220 270 320 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 \
  --algos lokr,locon --variants lyco
graph_check 100 lokr,lokr-lowrank,locon
pack_out

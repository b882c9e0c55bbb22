#!/usr/bin/env bash
# Issue 7 GPU run 143 (NOTES change 99): a conv adapter's down as one GEMM over the positions (the per-tap products,
# fp32) and a Triton tap sum (LYCO_TAPS_DOWN). The path per shape against float64 and cuDNN, then SD1.5 b8 LoCon
# and LoHa as graphs, A/B/A against LYCO_TAPS_DOWN=0 (the floor alongside), then the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_taps_down.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 120 python3 benchmarks/experiments/taps_down_check.py > "$OUT/taps_down_check.txt" 2>&1
echo "taps_down_check rc=$?"; grep -v Warn "$OUT/taps_down_check.txt" | cut -c1-200
aba LYCO_TAPS_DOWN 190 240 290 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 \
  --algos locon,loha --variants lyco
graph_check 100 locon,loha
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 83: every SD1.5 b8 3x3 conv alone (benchmarks/experiments/bypass_op_layers.py --set conv
# --rebuild), LoKr and LoCon adapters: the op and the delta path against the rebuilt op (merged weight, the
# weight gradient by cuDNN's wgrad). Run 82's profile of LoKr's 64x64 conv1: the op's adapter costs ≈ 410 us over
# the frozen conv's ≈ 260 (the 128-channel h conv 76 us, its cuDNN wgrad 86, 2 more layout conversions), where a
# full weight gradient is ≈ one frozen forward.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_rebuild_convs.sh
S=$(date +%s)
for algo in lokr locon; do
  mkdir -p "$OUT/$algo"
  timeout 260 python3 benchmarks/experiments/bypass_op_layers.py --algo $algo --out "$OUT/$algo" --set conv \
    --rebuild --reps 6 > "$OUT/$algo/log.txt" 2>&1
  echo "$algo rc=$? wall $(( $(date +%s) - S )) s"; grep -E 'layers, ms|taken|worst' "$OUT/$algo/log.txt"
done

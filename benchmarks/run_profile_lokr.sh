#!/usr/bin/env bash
# Issue 7 GPU run 12: where LoKr's and LoHa's step time goes (SD1.5 b8, torch.profiler, top 40
# kernels): floor, full fine-tune, LoKr auto (dense/structured by shape) and rebuilt, LoHa auto.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_profile_lokr.sh
set -u
OUT=${OUT:-.}
S=$(date +%s)
python3 benchmarks/train_step.py --models sd15 --batches 8 --algos lokr,loha \
  --variants lyco,lyco-rebuild --steps 10 --warmup 3 --profile floor,fullft,lokr,loha/lyco --profile-top 40 \
  --budget 240 --deadline $((S + 300)) --out "$OUT" > "$OUT/train_step.log" 2>&1
grep "^\[sd15" "$OUT/train_step.log" | cut -c1-150
echo "wall $(( $(date +%s) - S )) s"

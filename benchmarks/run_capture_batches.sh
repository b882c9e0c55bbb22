#!/usr/bin/env bash
# Issue 7 GPU run 102 (experiment on the intermittent capture failure, NOTES change 73): lokr-ckpt six times in one
# process without the retry — as is, then with factor_batch's module-level batches forgotten before each trainer
# (check_cuda_graph.py --clear-batches); failures counted.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_capture_batches.sh
set -u
C=lokr-ckpt,lokr-ckpt,lokr-ckpt,lokr-ckpt,lokr-ckpt,lokr-ckpt
for v in asis clear; do
  extra=""; [ $v = clear ] && extra="--clear-batches"
  mkdir -p "$OUT/$v"
  timeout 260 python3 benchmarks/check_cuda_graph.py --out "$OUT/$v" --cases $C --steps 8 --no-retry $extra \
    > "$OUT/$v.log" 2>&1
  echo "$v: $(grep -c '"ok": true' "$OUT/$v.log") ok, $(grep -c '"ok": false' "$OUT/$v.log") failed"
  grep -o '"ok": [a-z]*' "$OUT/$v.log" | tr '\n' ' '; echo
done

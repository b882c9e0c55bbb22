#!/usr/bin/env bash
# Issue 7 GPU run 20: after the capture's empty_cache and the default cuda_graph = "auto": the trainer's
# graphs against eager on the tiny model for every algorithm family (bit-level, benchmarks/check_cuda_graph.py),
# and the trainer's step time eager vs graph at SD1.5 b8 LoRA (benchmarks/train_graph.py, peak memory
# with the capture's warm-up cache emptied).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_verify.sh
set -u
OUT=${OUT:-.}
S=$(date +%s)
mkdir -p "$OUT/ccg"
timeout 260 python3 benchmarks/check_cuda_graph.py --out "$OUT/ccg" \
  --cases lora,lora-accum2,lora-eval,locon,loha,lokr,dora,diag-oft,boft,glora,ia3,full --steps 8 > "$OUT/check_cuda_graph.log" 2>&1
echo "check_cuda_graph rc=$?"; grep -E '"ok"|cases ok' "$OUT/check_cuda_graph.log" | sed -E 's/.*"case": "([^"]+)".*"ok": (true|false).*/\1 \2/' | tr '\n' ' '; echo
grep "cases ok" "$OUT/check_cuda_graph.log"
echo "ccg wall $(( $(date +%s) - S )) s"
mkdir -p "$OUT/tg"
timeout 200 python3 benchmarks/train_graph.py --help > /dev/null 2>&1 && \
  timeout 200 python3 benchmarks/train_graph.py --models sd15 --algos lora --out "$OUT/tg" > "$OUT/train_graph.log" 2>&1
echo "train_graph rc=$?"; tail -6 "$OUT/train_graph.log" | cut -c1-220
echo "wall $(( $(date +%s) - S )) s"

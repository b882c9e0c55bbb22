#!/usr/bin/env bash
# Issue 7 GPU run 9: the real trainer, eager vs cuda_graph, on the algorithms that now train on the
# rebuilt op (check_cuda_graph.py: adapters and gradients compared), then Full's step time with its
# own backward on the 1×1 convs (train_step.py, Full vs LyCORIS). One device call, ≤ 6 min.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_rebuild4.sh
set -u
OUT=${OUT:-.}
S=$(date +%s)
mkdir -p "$OUT/ccg"
timeout 200 python3 benchmarks/check_cuda_graph.py --out "$OUT/ccg" \
  --cases dora,dora-fp16,dora-ckpt,ia3,ia3-fp16,glora,boft,full --steps 8 > "$OUT/check_cuda_graph.log" 2>&1
echo "check_cuda_graph rc=$?"; tail -15 "$OUT/check_cuda_graph.log"
python3 benchmarks/train_step.py --models sd15 --batches 8 --algos full \
  --variants lyco,lycoris-eager --steps 20 --warmup 4 --graph --graph-steps 15 --rounds 2 \
  --budget 120 --deadline $((S + 330)) --tag _full --out "$OUT" > "$OUT/train_step_full.log" 2>&1
tail -12 "$OUT/train_step_full.log"
echo "wall $(( $(date +%s) - S )) s"

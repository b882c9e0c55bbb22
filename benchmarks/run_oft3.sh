#!/usr/bin/env bash
# Issue 7 GPU run 21: Diag-OFT/BOFT with every layer's Cayley inverse in one batched call per forward pass
# (oft._InverseBatch) against PEFT (two rounds, graph), BOFT (lyco only), and the trainer's CUDA graphs
# on them (a replay must redo the batched inverse with the current blocks: bit-level vs eager).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_oft3.sh
set -u
OUT=${OUT:-.}
S=$(date +%s)
python3 benchmarks/train_step.py --models sd15 --batches 8 --algos oft,boft \
  --variants lyco,peft --skip boft/peft --steps 20 --warmup 4 --graph --graph-steps 15 --rounds 2 \
  --budget 200 --deadline $((S + 220)) --out "$OUT" > "$OUT/train_step.log" 2>&1
grep "^\[sd15" "$OUT/train_step.log" | cut -c1-175
echo "step wall $(( $(date +%s) - S )) s"
mkdir -p "$OUT/ccg"
timeout 150 python3 benchmarks/check_cuda_graph.py --out "$OUT/ccg" \
  --cases diag-oft,diag-oft-fp16,diag-oft-ckpt,boft --steps 8 > "$OUT/check_cuda_graph.log" 2>&1
echo "check_cuda_graph rc=$?"; grep -E '"ok"' "$OUT/check_cuda_graph.log" | sed -E 's/.*"case": "([^"]+)".*"ok": (true|false).*/\1 \2/' | tr '\n' ' '; echo
grep "cases ok" "$OUT/check_cuda_graph.log"
echo "wall $(( $(date +%s) - S )) s"

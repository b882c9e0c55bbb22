#!/usr/bin/env bash
# Issue 7 GPU run 10 (the tree then: `lyco` = mode "auto" ran LoRA/LoCon/LoHa through an exact-forward form of
# algorithms/lowrank.py, since removed — NOTES.md change 25): the low-rank op for LoRA / LoCon / LoHa — `lyco` (auto:
# exact forward, merged-weight input gradient), `lyco-rebuild` (merged forward), `lyco-bypass` (the
# previous delta path) and PEFT in the same run, SD1.5 b8, eager and one CUDA graph, two rounds;
# BOFT and Full re-timed after their own backwards (vs LyCORIS); host issue time per layer, HEAD~ vs
# this tree (host_bench.py). One device call, ≤ 9 min. Carry .oldsrc (the previous src) and .whl.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_lowrank.sh
set -u
OUT=${OUT:-.}
S=$(date +%s)
for i in 1 2; do
  python3 benchmarks/host_bench.py .oldsrc/head/src lora,lora-conv3,loha,loha-conv3,full,full-conv
  python3 benchmarks/host_bench.py src lora,lora-conv3,loha,loha-conv3,full,full-conv
done > "$OUT/host_bench.txt" 2>&1
cat "$OUT/host_bench.txt"
python3 benchmarks/train_step.py --models sd15 --batches 8 \
  --algos lora,locon,loha,full,boft \
  --variants lyco,lyco-rebuild,lyco-bypass,peft,lycoris-eager \
  --skip lora/lycoris-eager,locon/lycoris-eager,loha/lycoris-eager,full/lyco-rebuild,full/lyco-bypass,boft/lyco-rebuild,boft/lyco-bypass,boft/peft \
  --steps 20 --warmup 4 --graph --graph-steps 15 --rounds 2 \
  --budget 470 --deadline $((S + 500)) --out "$OUT" > "$OUT/train_step.log" 2>&1
grep "^\[sd15" "$OUT/train_step.log" | cut -c1-150
echo "wall $(( $(date +%s) - S )) s"

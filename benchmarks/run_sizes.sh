#!/usr/bin/env bash
# Issue 7 GPU run 15: the sizes run 8 did not cover — SDXL batch 4 at 1024 px and SD1.5 batch 1 at
# 512 px — for LoRA, LoKr (now on the rebuilt op), LoHa and DoRA against PEFT, eager (SDXL) and eager +
# one CUDA graph (SD1.5 b1). One device call, ≤ 5.5 min.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_sizes.sh
set -u
OUT=${OUT:-.}
S=$(date +%s)
mkdir -p "$OUT/sdxl" "$OUT/sd15b1"
python3 benchmarks/train_step.py --models sdxl --batches 4 --algos lora,lokr,loha,dora \
  --variants lyco,peft --steps 10 --warmup 3 --baselines floor \
  --budget 190 --deadline $((S + 200)) --out "$OUT/sdxl" > "$OUT/sdxl/train_step.log" 2>&1
grep "^\[sdxl" "$OUT/sdxl/train_step.log" | cut -c1-150
python3 benchmarks/train_step.py --models sd15 --batches 1 --algos lora,lokr,loha,dora \
  --variants lyco,peft --steps 20 --warmup 4 --graph --graph-steps 15 \
  --budget 100 --deadline $((S + 320)) --out "$OUT/sd15b1" > "$OUT/sd15b1/train_step.log" 2>&1
grep "^\[sd15" "$OUT/sd15b1/train_step.log" | cut -c1-150
echo "wall $(( $(date +%s) - S )) s"

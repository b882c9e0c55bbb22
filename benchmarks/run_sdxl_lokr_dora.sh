#!/usr/bin/env bash
# Issue 7 GPU run 31: the session's two changes at the other size — SDXL, batch 4, 1024 px: LoKr's low-rank
# W2 as a LoRA (against its rebuilt op and PEFT; memory: h is kept per layer over 722 + 38 layers) and DoRA
# with its row vectors formed in the forward (against LyCORIS); eager (10 steps) and one CUDA graph.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_sdxl_lokr_dora.sh
set -u
OUT=${OUT:-.}
S=$(date +%s)
python3 benchmarks/train_step.py --models sdxl --batches 4 --algos lokr,dora \
  --variants lyco,lyco-rebuild,peft,lycoris-eager --skip lokr/lycoris-eager,dora/lyco-rebuild,dora/peft \
  --steps 10 --warmup 3 --graph --graph-steps 8 --baselines floor \
  --deadline $((S + 420)) --out "$OUT" > "$OUT/train_step.log" 2>&1
grep "^\[sdxl" "$OUT/train_step.log" | cut -c1-175
echo "wall $(( $(date +%s) - S )) s"

#!/usr/bin/env bash
# Issue 7 GPU run: one device call, ≤ 9 min wall, results flat in $OUT (8 files).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_issue7.sh
# 1. SD1.5 b8, eager: every algorithm vs its peers, 20 timed steps (p10/median/host issue time),
#    then the same step captured as one CUDA graph (device time without launch overhead, every
#    library alike), profiles of the configs that missed a goal in run 3.
#    Peers that were ≥ 40 % slower *and* not lighter than the best peer in run 3 are skipped
#    (--skip) to fit the time; BOFT (only its per-layer solve sync removed since run 3) is not rerun.
# 2. torch.compile (inductor) of the whole UNet for floor, lyco and PEFT alike, while time remains.
set -u
OUT=${OUT:-.}
S=$(date +%s)
python3 benchmarks/train_step.py --models sd15 --batches 8 \
  --algos lora,locon,loha,lokr,lokr-full,dora,oft,glora,ia3,full \
  --variants lyco,lyco-dora-detach,lyco-lokr-structured,lyco-lokr-dense,peft,lycoris-eager \
  --skip lora/lycoris-eager,locon/lycoris-eager,lokr/lycoris-eager,lokr-full/lycoris-eager,oft/lycoris-eager,lokr-full/lyco-lokr-structured,lokr-full/lyco-lokr-dense \
  --steps 20 --warmup 4 --graph --graph-steps 15 \
  --profile floor,lora/lyco,locon/lyco,locon/peft,lokr/lyco,lokr/peft,dora/lyco,dora/peft,oft/lyco \
  --deadline $((S + 345)) --out "$OUT" > "$OUT/train_step.log" 2>&1
tail -45 "$OUT/train_step.log"
python3 benchmarks/train_step.py --models sd15 --batches 8 --compile --baselines floor \
  --algos lora,lokr,dora --variants lyco,peft --steps 15 --warmup 3 \
  --deadline $((S + 530)) --tag _compile --out "$OUT" > "$OUT/train_step_compile.log" 2>&1
tail -25 "$OUT/train_step_compile.log"
echo "wall $(( $(date +%s) - S )) s"

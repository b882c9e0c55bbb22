#!/usr/bin/env bash
# Issue 7 GPU run 6: the rebuilt op (lyco/algorithms/rebuild.py: x kept, W′ rebuilt in backward) against
# the bypass and the peers, one device call, ≤ 9 min wall, results flat in $OUT.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_rebuild.sh
# SD1.5 b8, eager (p10/median/host) and the whole step as one CUDA graph; per algorithm: lyco (auto),
# lyco-rebuild (mode = "rebuild" on every layer), lyco-bypass where auto now rebuilds (DoRA), the peers.
# BOFT last (each of its configs takes 20–40 s).
set -u
OUT=${OUT:-.}
S=$(date +%s)
python3 benchmarks/train_step.py --models sd15 --batches 8 \
  --algos dora,ia3,lokr,loha,lora,locon,glora,oft,full,boft \
  --variants lyco,lyco-bypass,lyco-rebuild,lyco-dora-detach,peft,lycoris-eager \
  --skip ia3/lyco-bypass,lokr/lyco-bypass,loha/lyco-bypass,lora/lyco-bypass,locon/lyco-bypass,glora/lyco-bypass,oft/lyco-bypass,full/lyco-bypass,boft/lyco-bypass,full/lyco-rebuild,dora/lyco-rebuild,lora/lycoris-eager,locon/lycoris-eager,lokr/lycoris-eager,oft/lycoris-eager,boft/lycoris-eager \
  --steps 20 --warmup 4 --graph --graph-steps 15 \
  --budget 520 --deadline $((S + 520)) --out "$OUT" > "$OUT/train_step.log" 2>&1
tail -60 "$OUT/train_step.log"
echo "wall $(( $(date +%s) - S )) s"

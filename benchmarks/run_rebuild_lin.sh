#!/usr/bin/env bash
# Issue 7 GPU run 84: run 83's comparison (op / delta path / rebuilt op per layer, SD1.5 b8) on the linear layers
# (and 1x1 convs) of the lin set with LoKr's adapters (h in_m·r = 128 channels wide).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_rebuild_lin.sh
S=$(date +%s)
mkdir -p "$OUT/lokr"
timeout 400 python3 benchmarks/experiments/bypass_op_layers.py --algo lokr --out "$OUT/lokr" --set lin \
  --rebuild --reps 6 > "$OUT/lokr/log.txt" 2>&1
echo "lokr rc=$? wall $(( $(date +%s) - S )) s"; grep -E 'layers, ms|taken|worst' "$OUT/lokr/log.txt"

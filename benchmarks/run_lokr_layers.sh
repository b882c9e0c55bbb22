#!/usr/bin/env bash
# Issue 7 GPU run 82: where LoKr's step spends what LoRA's does not (run 81: cuDNN layout conversions +1.6 ms,
# strided copies +1.1, reductions +0.5 over LoRA's step). Per-kernel profiles of single SD1.5 b8 layers through
# the op (benchmarks/experiments/bypass_op_layers.py --profile): LoKr on three 3x3 convs and two linear layers,
# LoCon on the same convs for comparison.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_lokr_layers.sh
S=$(date +%s)
B=down_blocks.0.attentions.0.transformer_blocks.0
CONVS=down_blocks.0.resnets.0.conv1,down_blocks.1.resnets.1.conv1,up_blocks.1.resnets.0.conv1
for algo in lokr locon; do
  only=$CONVS
  [ $algo = lokr ] && only=$only,$B.attn1.to_q,$B.attn2.to_k,$B.ff.net.2
  mkdir -p "$OUT/$algo"
  timeout 200 python3 benchmarks/experiments/bypass_op_layers.py --algo $algo --out "$OUT/$algo" --profile \
    --only $only > "$OUT/$algo/log.txt" 2>&1
  echo "$algo rc=$? wall $(( $(date +%s) - S )) s"
done

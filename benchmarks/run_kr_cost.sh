#!/usr/bin/env bash
# Issue 7 GPU run 52: what LoHa's Khatri–Rao builds cost as device time — LoHa against a plain LoRA with its
# GEMM shapes (``lora-kr``: lin rank 64, conv rank 16; benchmarks/experiments/extra_algos.py), with LoRA,
# LoCon, LoKr and the floor in the same run, as one CUDA graph; profiles of LoHa and LoKr.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_kr_cost.sh
. benchmarks/_gpu_lib.sh
python3 benchmarks/experiments/extra_algos.py --models sd15 --batches 8 --libs lyco --variants lyco \
  --algos lora,locon,loha,lora-kr,lokr --baselines floor --steps 12 --warmup 3 --graph --graph-steps 20 \
  --profile loha/lyco,lokr/lyco --profile-top 30 --deadline $((S + 400)) --out "$OUT" > "$OUT/train_step.log" 2>&1
grep "^\[sd15\|graph" "$OUT/train_step.log" | cut -c1-175
echo "wall $(( $(date +%s) - S )) s"

#!/usr/bin/env bash
# Issue 7 GPU run 14: the real trainer, eager vs cuda_graph (check_cuda_graph.py: adapters and gradients
# compared), on LoKr's rebuilt op (mode=auto; fp16 autocast; gradient checkpointing) and on the
# low-rank rebuild op (mode=rebuild: LoRA, LoCon, LoHa). One device call, ≤ 4 min.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_graph_lokr.sh
set -u
OUT=${OUT:-.}
S=$(date +%s)
mkdir -p "$OUT/ccg"
timeout 220 python3 benchmarks/check_cuda_graph.py --out "$OUT/ccg" \
  --cases lokr,lokr-fp16,lokr-ckpt,lora-rebuild,locon-rebuild,loha-rebuild --steps 8 > "$OUT/check_cuda_graph.log" 2>&1
echo "check_cuda_graph rc=$?"; tail -15 "$OUT/check_cuda_graph.log"
echo "wall $(( $(date +%s) - S )) s"

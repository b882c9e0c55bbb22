#!/usr/bin/env bash
# Issue 7 GPU run 123 (NOTES change 84): under autocast one cast of an input several op layers share (q, k, v of a
# LayerNorm's fp32 output) and a linear layer's ∂x in that fp32 from its GEMM. The op's numbers on the GPU against
# float64 first (benchmarks/experiments/op_fp32_grads.py); then the real trainer (SD1.5-sized, graph): LoRA with
# autocast at this code / at change 83 (.ab_mid) / this code again (profiled); LoHa and LoKr with autocast at
# this code and at the session's start (.ab_old, before change 83); last the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_trainer_casts2.sh      (carry .whl, .ab_mid and .ab_old)
. benchmarks/_gpu_lib.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 120 python3 benchmarks/experiments/op_fp32_grads.py > "$OUT/op_fp32_grads.txt" 2>&1
echo "op_fp32_grads rc=$?"; grep -v Warn "$OUT/op_fp32_grads.txt" | grep -E "fp32-in|worst" | cut -c1-200
# tg LEG SCRIPT args…: one train_graph.py row (SD1.5) into $OUT/LEG
tg() {
  local leg=$1 py=$2
  shift 2
  mkdir -p "$OUT/$leg"
  timeout 150 python3 "$py" --out "$OUT/$leg" --models sd15 --warmup 5 --steps 20 "$@" > "$OUT/$leg/log.txt" 2>&1
  echo "$leg rc=$? wall $(( $(date +%s) - S )) s"; grep -E "(eager|graph):" "$OUT/$leg/log.txt" | grep graph | cut -c1-110
}
tg new-lora-ac benchmarks/train_graph.py --algos lora
tg mid-lora-ac .ab_mid/benchmarks/train_graph.py --algos lora
tg new2-lora-ac benchmarks/train_graph.py --algos lora --profile 2
tg new-loha-lokr-ac benchmarks/train_graph.py --algos loha,lokr
tg old-loha-lokr-ac .ab_old/benchmarks/train_graph.py --algos loha,lokr
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 80 lora,loha
pack_out

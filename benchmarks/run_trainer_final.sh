#!/usr/bin/env bash
# Issue 7 GPU run 125 (NOTES changes 83-85 at SDXL size): the op's numbers on the GPU against float64 with the sink's
# engagement counted (op_fp32_grads.py); the SD1.5-sized LoRA trainer step once more (the sink asked of autograd's
# engine per call now); the SDXL-sized trainer (1024 px, batch 4, LoRA r16, both text encoders) with autocast at this
# code and at the session's start (.ab_old, before change 83), and without autocast; the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_trainer_final.sh      (carry .whl and .ab_old)
. benchmarks/_gpu_lib.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 150 python3 benchmarks/experiments/op_fp32_grads.py > "$OUT/op_fp32_grads.txt" 2>&1
echo "op_fp32_grads rc=$?"; grep -v Warn "$OUT/op_fp32_grads.txt" | grep -E "sink|worst" | cut -c1-200
# tg LEG SCRIPT args…: one train_graph.py row into $OUT/LEG
tg() {
  local leg=$1 py=$2
  shift 2
  mkdir -p "$OUT/$leg"
  timeout 150 python3 "$py" --out "$OUT/$leg" --algos lora "$@" > "$OUT/$leg/log.txt" 2>&1
  echo "$leg rc=$? wall $(( $(date +%s) - S )) s"; grep -E "lora graph:" "$OUT/$leg/log.txt" | cut -c1-110
}
tg sd15-ac benchmarks/train_graph.py --models sd15 --warmup 5 --steps 20
tg sdxl-ac benchmarks/train_graph.py --models sdxl --warmup 4 --steps 12
tg sdxl-old-ac .ab_old/benchmarks/train_graph.py --models sdxl --warmup 4 --steps 12
tg sdxl-noac benchmarks/train_graph.py --models sdxl --warmup 4 --steps 12 --no-autocast
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 80 lora,lora-accum2,lora-te
pack_out

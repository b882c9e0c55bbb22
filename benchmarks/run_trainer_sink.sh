#!/usr/bin/env bash
# Issue 7 GPU run 124 (NOTES change 85): the op adds a linear layer's factor gradients into the parameters' existing
# gradients by their GEMMs (lowrank.step_casts(grad_sink=True), the trainer with one process) — autograd's per-
# parameter adds gone. The op's numbers on the GPU against float64 first (op_fp32_grads.py, its "sink" rows); then
# the real trainer (SD1.5-sized LoRA, graph) with autocast at this code / at change 84 (.ab_mid) / this code again,
# and without autocast both ways; last the trainer's graphs against eager in 8 cases (accumulation, fp16, ckpt, TE).
#   OUT=$OUT bash benchmarks/run_trainer_sink.sh      (carry .whl and .ab_mid)
. benchmarks/_gpu_lib.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 150 python3 benchmarks/experiments/op_fp32_grads.py > "$OUT/op_fp32_grads.txt" 2>&1
echo "op_fp32_grads rc=$?"; grep -v Warn "$OUT/op_fp32_grads.txt" | grep -E "sink|worst" | cut -c1-210
# tg LEG SCRIPT args…: one train_graph.py row (SD1.5 LoRA) into $OUT/LEG
tg() {
  local leg=$1 py=$2
  shift 2
  mkdir -p "$OUT/$leg"
  timeout 150 python3 "$py" --out "$OUT/$leg" --models sd15 --algos lora --warmup 5 --steps 20 "$@" \
    > "$OUT/$leg/log.txt" 2>&1
  echo "$leg rc=$? wall $(( $(date +%s) - S )) s"; grep -E "lora graph:" "$OUT/$leg/log.txt" | cut -c1-110
}
tg new-ac benchmarks/train_graph.py
tg mid-ac .ab_mid/benchmarks/train_graph.py
tg new2-ac benchmarks/train_graph.py
tg new-noac benchmarks/train_graph.py --no-autocast
tg mid-noac .ab_mid/benchmarks/train_graph.py --no-autocast
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 150 lora,lora-accum2,lora-fp16,lora-ckpt,locon,loha,lora-te,lora-rebuild
pack_out

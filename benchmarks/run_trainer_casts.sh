#!/usr/bin/env bash
# Issue 7 GPU run 122 (NOTES change 83): the trainer's fp32 adapter cast once per step and flat buffer
# (lowrank.step_casts), the ops' factors kept cast for their backward, the factors' gradients in fp32 from their
# GEMMs. First the op's numbers on the GPU against float64 (benchmarks/experiments/op_fp32_grads.py), then the real
# trainer (SD1.5-sized LoRA, graph) with autocast and without, new / old (HEAD's src before the change, carried as
# .ab_old) / new again with a profile; last the trainer's graphs against eager on the tiny model.
#   OUT=$OUT bash benchmarks/run_trainer_casts.sh      (carry .whl and .ab_old)
. benchmarks/_gpu_lib.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 120 python3 benchmarks/experiments/op_fp32_grads.py > "$OUT/op_fp32_grads.txt" 2>&1
echo "op_fp32_grads rc=$?"; grep -v Warn "$OUT/op_fp32_grads.txt" | cut -c1-200 | tail -18
# tg LEG SCRIPT args…: one train_graph.py row (SD1.5 LoRA) into $OUT/LEG
tg() {
  local leg=$1 py=$2
  shift 2
  mkdir -p "$OUT/$leg"
  timeout 170 python3 "$py" --out "$OUT/$leg" --models sd15 --algos lora --warmup 5 --steps 20 "$@" \
    > "$OUT/$leg/log.txt" 2>&1
  echo "$leg rc=$? wall $(( $(date +%s) - S )) s"; grep -E "lora (eager|graph):" "$OUT/$leg/log.txt" | cut -c1-120
}
tg new-ac benchmarks/train_graph.py
tg new-noac benchmarks/train_graph.py --no-autocast
tg old-ac .ab_old/benchmarks/train_graph.py
tg old-noac .ab_old/benchmarks/train_graph.py --no-autocast
tg new2-noac benchmarks/train_graph.py --no-autocast --profile 2
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 110 lora,locon,loha
pack_out

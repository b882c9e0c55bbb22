#!/usr/bin/env bash
# Issue 7 GPU run 126 (NOTES change 86): DoRA's and GLoRA's builds inside the rebuilt op take their fp32 factors from
# the storage's one cast per step (casts.cast_in_op). The real trainer (SD1.5-sized, autocast, graph) with DoRA r16
# and GLoRA r8, this code against the code before (.ab_mid), then the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_trainer_dora.sh      (carry .whl and .ab_mid)
. benchmarks/_gpu_lib.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# tg LEG SCRIPT ALGO: one train_graph.py row (SD1.5) into $OUT/LEG
tg() {
  mkdir -p "$OUT/$1"
  timeout 75 python3 "$2" --out "$OUT/$1" --models sd15 --algos "$3" --warmup 4 --steps 12 > "$OUT/$1/log.txt" 2>&1
  echo "$1 rc=$? wall $(( $(date +%s) - S )) s"; grep -E "graph:" "$OUT/$1/log.txt" | grep -v train_graph | cut -c1-110
}
tg new-dora benchmarks/train_graph.py dora
tg old-dora .ab_mid/benchmarks/train_graph.py dora
tg new-glora benchmarks/train_graph.py glora
tg old-glora .ab_mid/benchmarks/train_graph.py glora
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 40 dora,glora
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 156: the trainer's CUDA graphs against eager under fp16 autocast for session 20's paths (LoKr's
# full W2: the op's eye form and the rebuilt op's kernels; GLoRA through the op), every k×k conv on the eye form in
# a second pass; lokr-fp16 and lokr-lowrank as before.
#   OUT=$OUT bash benchmarks/run_autocast_check20.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 200 lokr-full-fp16,glora-fp16,lokr-fp16,lokr-lowrank
mkdir -p "$OUT/ccg_eye"
LYCO_LOKR_EYE_POSITIONS=1000 timeout 60 python3 benchmarks/check_cuda_graph.py --out "$OUT/ccg_eye" \
  --cases lokr-full-fp16 --steps 8 > "$OUT/check_cuda_graph_eye.log" 2>&1
echo "eye-everywhere rc=$?"; grep "cases ok" "$OUT/check_cuda_graph_eye.log"
pack_out

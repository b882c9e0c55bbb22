#!/usr/bin/env bash
# Issue 7 GPU run 153: LoKr with a full W2 on the op's LoRA form — ∂W1 straight from ∂y and h (one batched GEMM,
# never the out × in_m·out_k ∂U and its batch sum) and the ∂x weight by factor_triton.kron_merge (where addmm copied W
# and ran a GEMM of zeros). SD1.5 b8 lokr-full as graphs: this code / the code of runs 150-152 (its two files swapped
# in on the device) / this code again; the trainer's graphs against eager (lokr-full, lokr-full-ckpt; every k×k conv
# on the form). Before the run (the device has no git; benchmarks/.prev is ignored, so carried explicitly):
#   mkdir -p benchmarks/.prev && for f in lowrank lokr; do
#     git show 75ce613:src/lyco/algorithms/$f.py > benchmarks/.prev/$f.py; done
#   OUT=$OUT bash benchmarks/run_lokr_eye_dw1.sh      (carry .whl and benchmarks/.prev)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --algos lokr-full --variants lyco"
P=benchmarks/.prev
D=src/lyco/algorithms
step_table on 70 $A --baselines floor
mkdir -p /tmp/new && cp $D/lowrank.py $D/lokr.py /tmp/new/ && cp $P/lowrank.py $P/lokr.py $D/
step_table off 105 $A --no-baselines
cp /tmp/new/lowrank.py /tmp/new/lokr.py $D/
step_table on2 140 $A --no-baselines
graph_check 80 lokr-full,lokr-full-ckpt
mkdir -p "$OUT/ccg_eye"
LYCO_LOKR_EYE_POSITIONS=1000 timeout 50 python3 benchmarks/check_cuda_graph.py --out "$OUT/ccg_eye" --cases lokr-full \
  --steps 8 > "$OUT/check_cuda_graph_eye.log" 2>&1
echo "eye-everywhere rc=$?"; grep "cases ok" "$OUT/check_cuda_graph_eye.log"
pack_out

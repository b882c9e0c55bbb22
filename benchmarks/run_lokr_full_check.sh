#!/usr/bin/env bash
# Issue 7 GPU run 151: LoKr with a full W2 after runs 148-150 (the op's LoRA form on k×k convs with few positions
# per weight, the rebuilt op's Triton merge and weight-gradient kernels). The trainer's CUDA graphs against eager
# (lokr-full, lokr-full-ckpt, lokr), and once more with every k×k conv on the op's form (LYCO_LOKR_EYE_POSITIONS
# large); SDXL b4 lokr-full as graphs with the rule (default) and without it (=0).
#   OUT=$OUT bash benchmarks/run_lokr_full_check.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 100 lokr-full,lokr-full-ckpt,lokr
mkdir -p "$OUT/ccg_eye"
LYCO_LOKR_EYE_POSITIONS=1000 timeout 60 python3 benchmarks/check_cuda_graph.py --out "$OUT/ccg_eye" --cases lokr-full \
  --steps 8 > "$OUT/check_cuda_graph_eye.log" 2>&1
echo "eye-everywhere rc=$?"; grep "cases ok" "$OUT/check_cuda_graph_eye.log"
A="--models sdxl --batches 4 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 12 --algos lokr-full --variants lyco"
step_table on 260 $A --baselines floor
(export LYCO_LOKR_EYE_POSITIONS=0; step_table off 330 $A --no-baselines)
pack_out

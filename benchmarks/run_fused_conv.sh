#!/usr/bin/env bash
# (The 1×1 conv path measured here was taken out after run 135 — no gain in the step; NOTES change 92, kept as
# benchmarks/experiments/fused_conv1x1.patch: LYCO_FUSED_CONV no longer exists.)
# Issue 7 GPU run 134 (NOTES change 92): a 1×1 conv's op forward (SD1.5's transformer proj_in/proj_out) as one Triton
# GEMM over the NCHW input (lowrank_gemm.fused_conv1x1). The kernels per shape against float64 and timed
# (fused_gemm_check.py: the conv form against the bypass op's cuDNN form, five tile configurations), then SD1.5 b8 as
# graphs, A/B/A of LYCO_FUSED_CONV (LoRA, LoCon; the floor alongside); the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_fused_conv.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 150 python3 benchmarks/experiments/fused_gemm_check.py > "$OUT/fused_gemm_check.txt" 2>&1
echo "fused_gemm_check rc=$?"; grep -v Warn "$OUT/fused_gemm_check.txt" | cut -c1-330
aba LYCO_FUSED_CONV 150 220 290 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 \
  --algos lora,locon --variants lyco
graph_check 130 lora,locon,lora-ckpt
pack_out

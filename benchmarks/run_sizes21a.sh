#!/usr/bin/env bash
# Issue 7 GPU run 160 (session 21): the other sizes the issue names, at session 20's code — SD1.5 b1 (512 px) and SDXL
# b1 (1024 px), every algorithm, lyco against PEFT and LyCORIS (eager where they implement it, the same skips as
# run_final_table20.sh; BOFT's peers skipped on SDXL: both fail to capture and take seconds per eager step), graph
# columns and peaks; first the fused GEMM's timings at these sizes' linear shapes (fused_gemm_check.py --shapes other).
#   OUT=$OUT bash benchmarks/run_sizes21a.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 90 python3 benchmarks/experiments/fused_gemm_check.py --shapes other > "$OUT/fused_gemm_other.txt" 2>&1
echo "fused_gemm_check rc=$?"; grep -v Warn "$OUT/fused_gemm_other.txt" | cut -c1-200
SKIP=lora/lycoris-eager,locon/lycoris-eager,lokr/lycoris-eager,lokr-full/lycoris-eager,oft/lycoris-eager
step_table sd15b1 250 --jobs sd15:1 --algos lora,locon,loha,lokr,lokr-full,dora,oft,glora,ia3,full,boft \
  --variants lyco,peft,lycoris-eager --skip $SKIP --rounds 1 --steps 3 --warmup 2 --graph --graph-steps 20
step_table sdxlb1 560 --jobs sdxl:1 --baselines floor --algos lora,locon,loha,lokr,lokr-full,dora,oft,glora,ia3,full,boft \
  --variants lyco,peft,lycoris-eager --skip $SKIP,boft/peft,boft/lycoris-eager --rounds 1 --steps 3 --warmup 2 \
  --graph --graph-steps 15
for d in sd15b1 sdxlb1; do grep "÷best peer" "$OUT/$d/train_step.log" | grep graph | cut -c1-160; done
pack_out

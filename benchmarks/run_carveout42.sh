#!/usr/bin/env bash
# Issue 7, session 42 probe: the frozen GEMMs told to leave k SMs to the adapter's side streams
# (benchmarks/experiments/sm_carveout.py: cublasSetSmCountTarget on the main and autograd threads' handles and
# torch's cuBLASLt carveout) — run 300's SDXL b1 trace had LoRA's frozen 1280² GEMMs at 12.0 µs against the floor's
# 8.1 (one wave of 128 CTAs on 132 SMs, the side streams' kernels beside them). The GEMM chain alone and beside thin
# products for several k, then SDXL b1 and SD1.5 b1 steps with LYCO_PROBE_SM_CARVEOUT unset / k.
#   OUT=$OUT bash benchmarks/run_carveout42.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 60 python3 benchmarks/experiments/sm_carveout.py 0 4 8 16 32 2>&1 | tail -8
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
step_table c0 140 $A --jobs sdxl:1 --algos lora --baselines floor
(export LYCO_PROBE_SM_CARVEOUT=16; step_table c16 200 $A --jobs sdxl:1 --algos lora --baselines floor)
(export LYCO_PROBE_SM_CARVEOUT=8; step_table c8 240 $A --jobs sdxl:1 --algos lora --no-baselines)
(export LYCO_PROBE_SM_CARVEOUT=32; step_table c32 280 $A --jobs sdxl:1 --algos lora --no-baselines)
step_table s0 330 $A --jobs sd15:1 --algos lora,locon --baselines floor
(export LYCO_PROBE_SM_CARVEOUT=16; step_table s16 380 $A --jobs sd15:1 --algos lora,locon --baselines floor)
grep -h "sm carveout" $OUT/*/train_step.log | sort | uniq -c | cut -c1-250
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records c0 c16 c8 c32 s0 s16
pack_out

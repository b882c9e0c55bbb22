#!/usr/bin/env bash
# Issue 7, session 45: run 319 found LoKr's grouped linear ∂B by wgrad_triton's kernel a loss in the step (SDXL b1
# 76.98 / 75.98 / 77.10 on / off / on, SD1.5 b1 25.82 / 25.26 / 25.82) though faster alone (run 318): by inference its
# launch (up to 2 programs per SM, all 132) takes the SMs the frozen GEMMs need, where cuBLAS on the side stream is
# told 32. Here the launch aims at LYCO_WGRAD_LINEAR_SMS (default: the side's 32, one program each). SDXL b1 LoKr off
# (floor alongside) / 32 / off / 32, SD1.5 b1 LoKr off (floor) / 32, then the trainer's graphs against eager (lokr).
#   OUT=$OUT bash benchmarks/run_wgradlin45b.sh      (carry .whl; ≈ 390 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr"
(export LYCO_WGRAD_LINEAR=0; step_table x0 85 $A --jobs sdxl:1 --baselines floor)
step_table x32 125 $A --jobs sdxl:1 --no-baselines
(export LYCO_WGRAD_LINEAR=0; step_table x0b 165 $A --jobs sdxl:1 --no-baselines)
step_table x32b 205 $A --jobs sdxl:1 --no-baselines
(export LYCO_WGRAD_LINEAR=0; step_table s0 255 $A --jobs sd15:1 --baselines floor)
step_table s32 285 $A --jobs sd15:1 --no-baselines
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x0 x32 x0b x32b s0 s32
graph_check 110 lokr
pack_out

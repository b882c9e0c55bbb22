#!/usr/bin/env bash
# Issue 7, session 44, after run 309 (SDXL b1 LoKr 76.60 / 78.64 / 76.56 at LYCO_SIDE_SMS 32 / 0 / 32, floor 58.42:
# 1.311, 0.6 ms over 1.30): LoKr at 24, 16 and 48 SMs between two legs at 32, LoKr at 32 with LYCO_BLAS_CARVEOUT=16
# too, and LoRA at 24 (16: 68.01, 32: 67.17, 48: 67.65 in run 306). The floor in the first leg.
#   OUT=$OUT bash benchmarks/run_sidesms45.sh      (carry .whl; ≈ 340 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --jobs sdxl:1"
(export LYCO_SIDE_SMS=32; step_table k32 85 $A --algos lokr --baselines floor)
(export LYCO_SIDE_SMS=24; step_table k24 122 $A --algos lokr --no-baselines)
(export LYCO_SIDE_SMS=16; step_table k16 159 $A --algos lokr --no-baselines)
(export LYCO_SIDE_SMS=48; step_table k48 196 $A --algos lokr --no-baselines)
(export LYCO_SIDE_SMS=32; step_table k32b 233 $A --algos lokr --no-baselines)
(export LYCO_SIDE_SMS=32 LYCO_BLAS_CARVEOUT=16; step_table k32c 270 $A --algos lokr --no-baselines)
(export LYCO_SIDE_SMS=24; step_table r24 305 $A --algos lora --no-baselines)
(export LYCO_SIDE_SMS=32; step_table r32 340 $A --algos lora --no-baselines)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records k32 k24 k16 k48 k32b k32c r24 r32
pack_out

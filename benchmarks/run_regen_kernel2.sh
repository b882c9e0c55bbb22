#!/usr/bin/env bash
# Issue 7 GPU run 186 (session 26): LYCO_REGEN_KERNEL on / off / on with the self-test's reference in float64 (run 185's
# fp32 reference under the benchmark's TF32 was 2.4e-4 off and turned the kernel off) and the tiles run 185 chose —
# SD1.5 b8 LoRA with the floor and PEFT, SDXL b4 LoRA with PEFT; no self-test warning may appear.
#   OUT=$OUT bash benchmarks/run_regen_kernel2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 100 --jobs sd15:8 --algos lora --baselines floor --variants lyco,peft $A
(export LYCO_REGEN_KERNEL=0; step_table s8_off 120 --jobs sd15:8 --algos lora --no-baselines --variants lyco $A)
step_table s8_on2 140 --jobs sd15:8 --algos lora --no-baselines --variants lyco $A
step_table x4 240 --jobs sdxl:4 --algos lora --no-baselines --variants lyco,peft $A
(export LYCO_REGEN_KERNEL=0; step_table x4_off 300 --jobs sdxl:4 --algos lora --no-baselines --variants lyco $A)
step_table x4_on2 350 --jobs sdxl:4 --algos lora --no-baselines --variants lyco $A
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records s8 s8_off s8_on2 x4 x4_off x4_on2
pack_out

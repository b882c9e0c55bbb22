#!/usr/bin/env bash
# Issue 7 GPU run 187 (session 26): LYCO_REGEN_KERNEL on the other rows it touches — its gradients for LoHa (rank 64
# through the Khatri–Rao form) and GLoRA on the real SD1.5 config, the trainer's graphs against eager, SD1.5 b8 LoCon,
# LoHa and GLoRA on / off with the floor and the peers, SDXL b1 LoRA on / off with the floor and PEFT.
#   OUT=$OUT bash benchmarks/run_regen_kernel3.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
regen_check 120 loha,glora
graph_check 110 lora,loha
echo "checks: wall $(( $(date +%s) - S )) s"
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 330 --jobs sd15:8 --algos locon,loha,glora --baselines floor --variants lyco,peft $A
step_table s8_ly 350 --jobs sd15:8 --algos glora --no-baselines --variants lycoris-triton $A
(export LYCO_REGEN_KERNEL=0; step_table s8_off 400 --jobs sd15:8 --algos locon,loha,glora --no-baselines --variants lyco $A)
step_table x1 470 --jobs sdxl:1 --algos lora --baselines floor --variants lyco,peft $A
(export LYCO_REGEN_KERNEL=0; step_table x1_off 500 --jobs sdxl:1 --algos lora --no-baselines --variants lyco $A)
echo "self-test warnings: $(cat $OUT/*/train_step.log $OUT/*.log | grep -c 'self-test')"
step_records s8 s8_ly s8_off x1 x1_off
pack_out

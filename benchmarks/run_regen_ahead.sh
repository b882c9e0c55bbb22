#!/usr/bin/env bash
# Issue 7 GPU run 182 (session 25): the regenerated input built ahead by the next op's backward on its up stream
# (LYCO_REGEN_AHEAD) against regenerating it in the ∂D region (LYCO_REGEN_AHEAD=0, runs 179–181) and against keeping it
# (LYCO_INPUT_REGEN=0), PEFT in the same run; bitwise against the kept input on the real SD1.5 config and the
# trainer's graphs = eager with it.
# (runs 178–183 printed a subset of step_records' fields with a loop of their own)
#   OUT=$OUT bash benchmarks/run_regen_ahead.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
regen_check 80 lora
graph_check 70 lora
echo "graph_check: wall $(( $(date +%s) - S )) s"
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 190 --jobs sd15:8 --algos lora,glora --baselines floor --variants lyco,peft $A
(export LYCO_REGEN_AHEAD=0; step_table s8_sync 215 --jobs sd15:8 --algos lora,glora --no-baselines --variants lyco $A)
(export LYCO_INPUT_REGEN=0; step_table s8_off 240 --jobs sd15:8 --algos lora,glora --no-baselines --variants lyco $A)
step_table x4 310 --jobs sdxl:4 --algos lora --no-baselines --variants lyco,peft $A
(export LYCO_REGEN_AHEAD=0; step_table x4_sync 350 --jobs sdxl:4 --algos lora --no-baselines --variants lyco $A)
(export LYCO_INPUT_REGEN=0; step_table x4_off 390 --jobs sdxl:4 --algos lora --no-baselines --variants lyco $A)
step_records s8 s8_sync s8_off x4 x4_sync x4_off
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 165 (session 22): run 164's timeline showed SDXL b1's LoRA step on the delta path — bypass_pays
# takes the op on linear layers only where rows ≥ out (run 72's per-layer rule, measured before the side streams),
# and SDXL's 32×32 level has 1024 rows against 1280 outputs: five GEMMs and an add in a row per layer's backward.
# A/B/A of LYCO_BYPASS_ROWS (the rule's factor c in rows ≥ c·out): as the code has it (1), 0 (the op on every linear
# layer and 1×1 conv), as the code has it again; SDXL b1, SD1.5 b1, SD1.5 b8, SDXL b4. Then the trainer's graphs
# against eager with c = 0.
#   OUT=$OUT bash benchmarks/run_bypass_rows.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 12 --variants lyco"
step_table x1_on 130 --jobs sdxl:1 --algos lora,locon,loha,lokr --baselines floor $A
(export LYCO_BYPASS_ROWS=0; step_table x1_off 210 --jobs sdxl:1 --algos lora,locon,loha,lokr --no-baselines $A --graph-trace lora)
step_table x1_on2 230 --jobs sdxl:1 --algos lora --no-baselines $A
step_table s1_on 265 --jobs sd15:1 --algos lora,locon,loha,lokr --baselines floor $A
(export LYCO_BYPASS_ROWS=0; step_table s1_off 295 --jobs sd15:1 --algos lora,locon,loha,lokr --no-baselines $A --graph-trace lora)
step_table s1_on2 305 --jobs sd15:1 --algos lora --no-baselines $A
step_table s8_on 330 --jobs sd15:8 --algos lora,locon --no-baselines $A
(export LYCO_BYPASS_ROWS=0; step_table s8_off 355 --jobs sd15:8 --algos lora,locon --no-baselines $A)
step_table x4_on 390 --jobs sdxl:4 --algos lora --no-baselines $A
(export LYCO_BYPASS_ROWS=0; step_table x4_off 425 --jobs sdxl:4 --algos lora --no-baselines $A)
python3 benchmarks/graph_trace.py $OUT/x1_off/graph_trace_sdxl_b1_lora_lyco.json > $OUT/x1_off/trace.txt 2>&1; head -1 $OUT/x1_off/trace.txt | cut -c1-160
(export LYCO_BYPASS_ROWS=0; graph_check 70 lora,locon)
pack_out

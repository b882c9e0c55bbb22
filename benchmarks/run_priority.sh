#!/usr/bin/env bash
# Issue 7 GPU run 170 (session 23): SDXL b1 after changes 109-112 with PEFT in the same run (runs 160-161 had the
# peers), one replay's timeline of LoRA and of the floor (--graph-trace); and stream priorities in the captured
# step — the capture stream high (BENCH_CAPTURE_PRIORITY=-1: the frozen layers' chain first) or lyco's side
# streams high (LYCO_SIDE_PRIORITY=-1: the adapter's products first), against both at 0, at SDXL b1 and SD1.5 b8.
#   OUT=$OUT bash benchmarks/run_priority.sh      (carry .whl)
# After the run: no effect (NOTES session 23); both switches were removed from the tree, so on a later tree the
# legs that set them run the default.
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table x1 175 --jobs sdxl:1 --algos lora,locon --baselines floor --variants lyco,peft $A --graph-trace lora/lyco,floor
python3 benchmarks/graph_trace.py $OUT/x1/graph_trace_sdxl_b1_lora_lyco.json $OUT/x1/graph_trace_sdxl_b1_floor_floor.json \
  > $OUT/x1/lora_vs_floor.txt 2>&1 && grep "^== " $OUT/x1/lora_vs_floor.txt | cut -c1-200
A="$A --variants lyco --no-baselines"
(export BENCH_CAPTURE_PRIORITY=-1; step_table x1_pcap 215 --jobs sdxl:1 --algos lora $A)
(export LYCO_SIDE_PRIORITY=-1; step_table x1_pside 255 --jobs sdxl:1 --algos lora $A)
step_table x1_base 295 --jobs sdxl:1 --algos lora $A
step_table s8_base 325 --jobs sd15:8 --algos lora $A
(export BENCH_CAPTURE_PRIORITY=-1; step_table s8_pcap 350 --jobs sd15:8 --algos lora $A)
(export LYCO_SIDE_PRIORITY=-1; step_table s8_pside 375 --jobs sd15:8 --algos lora $A)
pack_out

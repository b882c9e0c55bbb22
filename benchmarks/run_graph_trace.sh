#!/usr/bin/env bash
# Issue 7 GPU run 164 (session 22): where a captured step's time goes on the GPU's timeline — one replay of each
# step under torch.profiler (train_step.py --graph-trace; benchmarks/graph_trace.py splits the span into idle time
# and each kernel's exposed time), LoRA against the floor at SDXL b1, SD1.5 b1, SD1.5 b8 and SDXL b4, Diag-OFT at
# SDXL b4; (IA)³ at SD1.5 b1 with change 108 (and with its input-width threshold at 0); the trainer's graphs against
# eager for (IA)³ with change 108's kernels on.
#   OUT=$OUT bash benchmarks/run_graph_trace.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 12 --variants lyco --graph-trace all"
step_table sdxl1 70 --jobs sdxl:1 --algos lora --baselines floor $A
step_table sd1 110 --jobs sd15:1 --algos lora,ia3 --baselines floor $A
(export LYCO_IA3_KEEP_OUTPUT_MIN_IN=0; step_table sd1_ia3_min0 125 --jobs sd15:1 --algos ia3 --no-baselines $A)
step_table sd8 170 --jobs sd15:8 --algos lora --baselines floor $A
step_table sdxl4 260 --jobs sdxl:4 --algos lora,oft --baselines floor $A
for d in sdxl1:sdxl_b1 sd1:sd15_b1 sd8:sd15_b8 sdxl4:sdxl_b4; do
  dir=${d%%:*}; tag=${d##*:}
  python3 benchmarks/graph_trace.py $OUT/$dir/graph_trace_${tag}_lora_lyco.json $OUT/$dir/graph_trace_${tag}_floor_floor.json \
    > $OUT/$dir/lora_vs_floor.txt 2>&1 && grep "^== .*−" $OUT/$dir/lora_vs_floor.txt
done
graph_check 100 ia3,ia3-fp16
pack_out

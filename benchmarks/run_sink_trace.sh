#!/usr/bin/env bash
# Issue 7 GPU run 243 (session 33): why lyco's step as its trainer's (--lyco-grad-sink, the factor gradients added into
# kept .grad tensors) is ≈ 0.13–0.19 ms over the step that returns them to autograd at SD1.5 b1 LoRA (runs 241–242:
# 22.75 against 22.56–22.62 ms): one replay's timeline of each (graph_trace.py: idle and exposed time per kernel) and
# their difference; then LYCO_MERGED_ROWS at SDXL b4 (change 134's c = 1 against c = 0; not measured at b4) (≈ 6 min).
# Run 243 ran the traces; its SDXL legs failed (the trace paths were named P and S: S is _gpu_lib.sh's start time) —
# run 244 ran them alone on the same machine, deadlines 100 and 200 s (results/run244_h100_sdxl_b4_merged_rows/).
#   OUT=$OUT bash benchmarks/run_sink_trace.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
J="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --jobs sd15:1 --algos lora --no-baselines --variants lyco"
step_table plain 80 $J --graph-trace lora/lyco
step_table sink 160 $J --graph-trace lora/lyco --lyco-grad-sink
gzip "$OUT"/plain/graph_trace_*.json "$OUT"/sink/graph_trace_*.json
PT="$OUT/plain/graph_trace_sd15_b1_lora_lyco.json.gz"; ST="$OUT/sink/graph_trace_sd15_b1_lora_lyco.json.gz"
echo "== sink - plain"; python3 benchmarks/graph_trace.py $ST $PT --top 30 | tail -42
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 12 --jobs sdxl:4 --algos lora --no-baselines --variants lyco"
step_table x4c1 260 $A
(export LYCO_MERGED_ROWS=0; step_table x4c0 360 $A)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records plain sink x4c1 x4c0
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 223 (session 30): (IA)³'s self-attention q/k/v and cross-attention k/v as one output-keeping op
# (ia3._SharedKeepOutput through lyco.siblings: one stacked W′ build, one GEMM; backward one ∂y copy, one channel pass,
# one finish, one GEMM) — SDXL b1 forced on (eager too: the script's gradient check covers it) beside PEFT, off
# (LYCO_SHARED_INPUT=0), on again with the default policy; a trace of one replay on and off; SD1.5 b8 beside PEFT,
# SDXL b4; the trainer's graphs against eager under fp16 autocast, where the output-keeping ops now gate on the GEMM's
# dtype (a norm's fp32 output under autocast).
#   OUT=$OUT bash benchmarks/run_ia3_shared.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
(export LYCO_SHARED_INPUT=1 LYCO_IA3_KEEP_OUTPUT=1
 step_table x1 60 --no-baselines --variants lyco,peft --jobs sdxl:1 --algos ia3 --graph-trace ia3/lyco $A)
(export LYCO_SHARED_INPUT=0; step_table x1off 150 --no-baselines --variants lyco --jobs sdxl:1 --algos ia3 --graph-trace ia3/lyco $A)
step_table x1on2 220 --no-baselines --variants lyco --jobs sdxl:1 --algos ia3 $A
step_table s8 300 --no-baselines --variants lyco,peft --jobs sd15:8 --algos ia3 $A
step_table x4 380 --no-baselines --variants lyco --jobs sdxl:4 --algos ia3 $A
(export LYCO_IA3_KEEP_OUTPUT_MIN_IN=0 LYCO_OFT_KEEP_OUTPUT_MIN_IN=0; graph_check 150 ia3-fp16,diag-oft-b16-fp16,ia3)
gzip "$OUT"/x1*/graph_trace_*.json 2>/dev/null
echo "== on - off"
python3 benchmarks/graph_trace.py "$OUT"/x1/graph_trace_*ia3_lyco.json.gz "$OUT"/x1off/graph_trace_*ia3_lyco.json.gz --top 25 | tail -40
echo "lyco warnings: $(cat $OUT/*/train_step.log $OUT/check_cuda_graph.log | grep -c 'RuntimeWarning: lyco')"
grep -h "RuntimeWarning: lyco" $OUT/*/train_step.log $OUT/check_cuda_graph.log | sort | uniq -c | head
step_records x1 x1off x1on2 s8 x4
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 224 (session 30): output-mode (IA)³ scaling its output and ∂y instead of building W′ where those are
# the smaller (ia3._scale_output, LYCO_IA3_SCALE_OUTPUT: forward where rows < in, backward where rows < 2·in) —
# SDXL b1 with every (IA)³ path forced on (eager too: the script's float64 gradient check covers them, the GEGLU-fused
# ff.net.2 and the GEGLU's column sums among them) beside PEFT, off, on again with the default policy (traces of one
# replay on and off); SDXL b4 and SD1.5 b8 beside PEFT; the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_ia3_scale.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
(export LYCO_IA3_SCALE_OUTPUT=1 LYCO_IA3_KEEP_OUTPUT=1 LYCO_SHARED_INPUT=1 LYCO_GEGLU_FUSE=1 LYCO_IA3_GEGLU_SUMS=1 \
   LYCO_IA3_ROWS_KERNEL=1
 step_table x1 120 --no-baselines --variants lyco,peft --jobs sdxl:1 --algos ia3 --graph-trace ia3/lyco $A)
(export LYCO_IA3_SCALE_OUTPUT=0; step_table x1off 200 --no-baselines --variants lyco --jobs sdxl:1 --algos ia3 --graph-trace ia3/lyco $A)
step_table x1on 270 --no-baselines --variants lyco --jobs sdxl:1 --algos ia3 $A
step_table x4 340 --no-baselines --variants lyco,peft --jobs sdxl:4 --algos ia3 $A
step_table s8 470 --no-baselines --variants lyco,peft --jobs sd15:8 --algos ia3 $A
(export LYCO_IA3_KEEP_OUTPUT_MIN_IN=0; graph_check 100 ia3-fp16,ia3)
gzip "$OUT"/x1*/graph_trace_*.json 2>/dev/null
echo "== on - off"
python3 benchmarks/graph_trace.py "$OUT"/x1/graph_trace_*ia3_lyco.json.gz "$OUT"/x1off/graph_trace_*ia3_lyco.json.gz --top 16 | tail -30
echo "lyco warnings: $(cat $OUT/*/train_step.log $OUT/check_cuda_graph.log | grep -c 'RuntimeWarning: lyco')"
grep -h "RuntimeWarning: lyco" $OUT/*/train_step.log $OUT/check_cuda_graph.log | sort | uniq -c | head
step_records x1 x1off x1on x4 s8
pack_out

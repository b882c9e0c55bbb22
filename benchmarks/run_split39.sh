#!/usr/bin/env bash
# Issue 7 GPU run of session 39 (short: the session's last device minutes): does cuDNN attention's memset → kernel
# wait in SD1.5 b1 LoRA's graph (as given) follow the number of side streams? LYCO_SIDE_SPLIT on (∂U on a second
# side stream, the default) and off (one side stream), both traced; compare with
#   python benchmarks/graph_trace.py --gaps on/graph_trace_sd15_b1_lora_lyco.json.gz
#   OUT=$OUT bash benchmarks/run_split39.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --no-baselines --algos lora"
step_table on 100 $A --graph-trace lora/lyco
(export LYCO_SIDE_SPLIT=0; step_table off 150 $A --graph-trace lora/lyco)
gzip "$OUT"/*/graph_trace_*.json
step_records on off
pack_out

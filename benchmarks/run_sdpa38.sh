#!/usr/bin/env bash
# Issue 7 GPU run of session 38: where LoRA's extra idle at SD1.5 b1 sits (run 274: 32 + 32 waits between cuDNN
# attention's Memset and its next kernel, 9.6 / 7.4 µs each against 4.7 / 4.3 in the floor, +0.26 ms) — the floor and
# LoRA on the frozen conv layout with torch's attention backend (cuDNN there) and with flash attention for all alike
# (PEFT beside), LoRA with the adapter's side streams off (traced), and LoCon with LYCO_DGRAD_WEIGHT_CL at 0 again
# (run 276: 19.73 against 19.85 ms).
#   OUT=$OUT bash benchmarks/run_sdpa38.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --frozen-cl rule"
step_table base 60 $A --variants lyco --baselines floor --algos lora --graph-trace floor/floor,lora/lyco
step_table flash 150 $A --sdpa flash --variants lyco,peft --baselines floor --algos lora --graph-trace floor/floor,lora/lyco
(export LYCO_BYPASS_STREAMS=0; step_table nostreams 190 $A --variants lyco --no-baselines --algos lora --graph-trace lora/lyco)
(export LYCO_DGRAD_WEIGHT_CL=0; step_table nodgrad 225 $A --variants lyco --no-baselines --algos locon)
step_table locon 260 $A --variants lyco --no-baselines --algos locon
B="--jobs sd15:8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --frozen-cl rule --variants lyco --algos lora"
step_table b8 300 $B --baselines floor
step_table b8flash 340 $B --sdpa flash --baselines floor
gzip "$OUT"/*/graph_trace_*.json
step_records base flash nostreams nodgrad locon b8 b8flash
pack_out

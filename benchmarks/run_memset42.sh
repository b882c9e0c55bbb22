#!/usr/bin/env bash
# Issue 7, prepared in session 41 for the next: lyco.train.graph_memsets with the self-test's fix after run 297 (a node
# list asked for with a count of 0) — is its self-test passing on the card (no "memset nodes stay as captured"
# warning, memsets_replaced > 0), do the trainer's graphs with memsets replaced equal eager (lora, locon, lokr), and
# the SD1.5 b1 gain of run 296's probe (floor 19.86 → 19.68 ms, LoKr 25.86 → 25.47, LoRA 22.07 → 21.65) with the
# library's kernel: LYCO_GRAPH_MEMSETS=1 / 0 / 1, the floor in every leg (the switch changes the floor's graph too).
# If all hold: graph_memsets.DEFAULT = "1".
#   OUT=$OUT bash benchmarks/run_memset42.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
# first the device self-test alone (seconds): where it fails, the rest would measure nothing new
python3 -c "
import torch; from lyco.train import graph_memsets as gm
print('self-test:', gm._self_test(0) or 'passed')
" 2>&1 | tail -3 | tee $OUT/selftest.txt
grep -q "self-test: passed" $OUT/selftest.txt || { pack_out; exit 1; }
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --jobs sd15:1 --baselines floor"
(export LYCO_GRAPH_MEMSETS=1; step_table on 170 $A --algos lokr,lora,locon)
(export LYCO_GRAPH_MEMSETS=0; step_table off 250 $A --algos lokr,lora,locon)
(export LYCO_GRAPH_MEMSETS=1; step_table on2 330 $A --algos lokr,lora,locon)
(export LYCO_GRAPH_MEMSETS=1; graph_check 120 lora,locon,lokr)
grep -o '"memsets_replaced": [0-9]*' $OUT/check_cuda_graph.log | sort | uniq -c
echo "lyco warnings: $(cat $OUT/*/train_step.log $OUT/check_cuda_graph.log | grep -c 'RuntimeWarning: lyco')"
grep -h "RuntimeWarning: lyco" $OUT/*/train_step.log $OUT/check_cuda_graph.log | sort | uniq -c | cut -c1-300 | head -5
python3 -c "import json; [print(d, x['algo'], x.get('graph_memsets_replaced')) for d in ('on','off','on2') for x in json.load(open('$OUT/'+d+'/train_step.json'))['records']]"
step_records on off on2
pack_out

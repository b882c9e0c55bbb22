#!/usr/bin/env bash
# Issue 7 GPU run of session 41 (run 297, graph_memsets then on by default: its self-test failed — see the module
# doc — so both legs ran the graphs as captured; run_memset42.sh is the next): lyco.train.graph_memsets (the libraries' memset nodes made kernel nodes after
# capture; the trainer's graphs and benchmarks/train_step.py's, floor and peers alike) — SD1.5 b1 floor, LoRA, LoCon,
# LoKr with it (the default) and with LYCO_GRAPH_MEMSETS=0, then the trainer's graphs against eager (lora, locon,
# lokr; check_cuda_graph's rows carry memsets_replaced). Run 296 measured the probe's copy: floor 19.86 → 19.68 ms,
# LoKr 25.86 → 25.47, LoRA 22.07 → 21.65.
#   OUT=$OUT bash benchmarks/run_memset41b.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --jobs sd15:1 --baselines floor"
step_table on 130 $A --algos lokr,lora,locon
(export LYCO_GRAPH_MEMSETS=0; step_table off 200 $A --algos lokr,lora,locon)
graph_check 90 lora,locon,lokr
grep -o '"memsets_replaced": [0-9]*' $OUT/check_cuda_graph.log | sort | uniq -c
echo "lyco warnings: $(cat $OUT/*/train_step.log $OUT/check_cuda_graph.log | grep -c 'RuntimeWarning: lyco')"
grep -h "RuntimeWarning: lyco" $OUT/*/train_step.log $OUT/check_cuda_graph.log | sort | uniq -c | head -5
python3 -c "import json; [print(d, x['algo'], x.get('graph_memsets_replaced')) for d in ('on','off') for x in json.load(open('$OUT/'+d+'/train_step.json'))['records']]"
step_records on off
pack_out

#!/usr/bin/env bash
# Issue 7, session 42, after run 298 turned lyco.train.graph_memsets on by default: its gain at SDXL b1 (floor,
# LoKr, LoRA, LoCon; LYCO_GRAPH_MEMSETS 1 / 0 / 1) and SD1.5 b8 (floor, LoKr, LoCon; 1 / 0), the floor in every leg
# (the switch changes the floor's graph too).
#   OUT=$OUT bash benchmarks/run_memset42b.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --baselines floor"
(export LYCO_GRAPH_MEMSETS=1; step_table on 130 $A --jobs sdxl:1 --algos lokr,lora,locon)
(export LYCO_GRAPH_MEMSETS=0; step_table off 220 $A --jobs sdxl:1 --algos lokr,lora,locon)
(export LYCO_GRAPH_MEMSETS=1; step_table on2 310 $A --jobs sdxl:1 --algos lokr,lora,locon)
(export LYCO_GRAPH_MEMSETS=1; step_table b8on 380 $A --jobs sd15:8 --algos lokr,locon)
(export LYCO_GRAPH_MEMSETS=0; step_table b8off 450 $A --jobs sd15:8 --algos lokr,locon)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
python3 -c "import json; [print(d, x['algo'], x.get('graph_memsets_replaced')) for d in ('on','off','b8on','b8off') for x in json.load(open('$OUT/'+d+'/train_step.json'))['records']]"
step_records on off on2 b8on b8off
pack_out

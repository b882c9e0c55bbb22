#!/usr/bin/env bash
# Issue 7 GPU run of session 41 (a probe): run 292's SD1.5 b1 graphs wait 9.3 µs on average from each memset node to
# the kernel after it in LoKr's step (95 of them) against 5.3 in the floor's. The same steps with every memset node
# made a kernel node after capture, floor included: off / on / off. Run 296 ran it with the probe's switch
# (LYCO_BENCH_MEMSET_KERNELS=1, the replacement then in benchmarks/experiments/memset_node_bench.py); its successor is
# lyco.train.graph_memsets, switched by LYCO_GRAPH_MEMSETS (below).
#   OUT=$OUT bash benchmarks/run_memset41.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --jobs sd15:1 --baselines floor"
step_table off 160 $A --algos lokr,lora
(export LYCO_GRAPH_MEMSETS=1; step_table on 250 $A --algos lokr,lora)
step_table off2 330 $A --algos lokr,lora
grep -h "memset nodes made" $OUT/on/train_step.log | head -5
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records off on off2
pack_out

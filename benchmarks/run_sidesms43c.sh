#!/usr/bin/env bash
# Issue 7, session 43: LYCO_SIDE_SMS=32 as the library's default (lyco.algorithms.blas_sms.side) — the trainer's
# graphs against eager with it (lora, locon, lokr, loha), and SD1.5 b1 LoKr and LoHa at 32 / 0 / 32 (the floor in the
# first leg; runs 305–306 measured LoRA and LoCon only).
#   OUT=$OUT bash benchmarks/run_sidesms43c.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 150 lora,locon,lokr,loha
echo "ccg: wall $(( $(date +%s) - S )) s"
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --jobs sd15:1 --algos lokr,loha"
step_table on 270 $A --baselines floor
(export LYCO_SIDE_SMS=0; step_table off 330 $A --no-baselines)
step_table on2 390 $A --no-baselines
echo "lyco warnings: $(cat $OUT/*/train_step.log $OUT/check_cuda_graph.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2
pack_out

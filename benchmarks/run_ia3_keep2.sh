#!/usr/bin/env bash
# Issue 7 GPU run 163 (session 21): run 162 again after its self-test fix — run 162's kernels never ran (their GPU
# self-test set a scale of exactly zero, whose sign the kernel's FMA and torch's rounding resolved differently, and
# the gate turned them off). The self-test's verdict, then (IA)³ with LYCO_IA3_KEEP_OUTPUT=1 (eager steps too, so
# the benchmark's float64 gradient check runs the kernels) against =0, SD1.5 b8 and SDXL b4 as graphs.
#   OUT=$OUT bash benchmarks/run_ia3_keep2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
python3 -c "
import torch; from lyco.algorithms import scale_triton as s
print('self-test', s._compare(torch.device('cuda'), torch.bfloat16), s.usable(torch.empty(1, device='cuda', dtype=torch.bfloat16)))"
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --algos ia3 --variants lyco --no-baselines"
(export LYCO_IA3_KEEP_OUTPUT=1; step_table on 60 --jobs sd15:8 $A)
(export LYCO_IA3_KEEP_OUTPUT=0; step_table off 85 --jobs sd15:8 $A)
(export LYCO_IA3_KEEP_OUTPUT=1; step_table sdxl_on 120 --jobs sdxl:4 $A)
(export LYCO_IA3_KEEP_OUTPUT=0; step_table sdxl_off 150 --jobs sdxl:4 $A)
pack_out

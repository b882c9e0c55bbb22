#!/usr/bin/env bash
# Issue 7 GPU run 208 (session 28): change 121 — a GEGLU projection's (IA)³ ∂w from the column sums the GEGLU kernel of
# ff.net.2 forms beside its tiles (LYCO_IA3_GEGLU_SUMS; A/B with it at 0), with the side stream for ∂w reverted: the
# GEGLU section of ia3_kernel_bench.py; the trainer's graphs against eager (ia3); SD1.5 b8 and SDXL b4 (IA)³ with
# floor-geglu and PEFT; the benchmark's float64 gradient check with every captured-steps path at 1 (its eager check then
# runs the kernels and the links too).
#   OUT=$OUT bash benchmarks/run_ia3_geglu_sums.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
mkdir -p $OUT/kbench
timeout 100 python3 benchmarks/experiments/ia3_kernel_bench.py $OUT/kbench --geglu-only > $OUT/kbench/log.txt 2>&1
echo "kbench rc=$? wall $(( $(date +%s) - S )) s"
grep -A3 "^== " $OUT/kbench/log.txt
graph_check 80 ia3
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --algos ia3"
step_table s8 300 --baselines floor-geglu --variants lyco,peft --jobs sd15:8 $A
(export LYCO_IA3_GEGLU_SUMS=0; step_table s8_off 330 --no-baselines --variants lyco --jobs sd15:8 $A)
step_table x4 530 --no-baselines --variants lyco,peft --jobs sdxl:4 $A
(export LYCO_IA3_KEEP_OUTPUT=1 LYCO_GEGLU_FUSE=1 LYCO_IA3_GEGLU_SUMS=1 LYCO_IA3_ROWS_KERNEL=1
 step_table s8_all1 560 --no-baselines --variants lyco --jobs sd15:8 $A)
grep -h "check" $OUT/s8/train_step.log $OUT/s8_all1/train_step.log | grep -o "check.*" | cut -c1-200
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records s8 s8_off x4 s8_all1
pack_out

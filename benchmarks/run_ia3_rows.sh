#!/usr/bin/env bash
# Issue 7 GPU run 206 (session 28): (IA)³'s output-scale weights in one Triton launch (scale_triton.scale_rows,
# LYCO_IA3_ROWS_KERNEL) — the per-layer kernels at SD1.5 b8 / SDXL b4 shapes (ia3_kernel_bench.py: the build against
# torch's addcmul, the channel gradient's tile settings, the weight-gradient route under the 512-input line); the
# trainer's graphs against eager (ia3); SD1.5 b8 (IA)³ with the floors and PEFT, the kernel off, every linear layer
# keeping its output (LYCO_IA3_KEEP_OUTPUT_MIN_IN=0).
#   OUT=$OUT bash benchmarks/run_ia3_rows.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
mkdir -p $OUT/kbench
timeout 200 python3 benchmarks/experiments/ia3_kernel_bench.py $OUT/kbench > $OUT/kbench/log.txt 2>&1
echo "kbench rc=$? wall $(( $(date +%s) - S )) s"
grep -A40 "^== " $OUT/kbench/log.txt
graph_check 80 ia3
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --jobs sd15:8 --algos ia3"
step_table s8 520 --baselines floor,floor-geglu --variants lyco,peft $A
(export LYCO_IA3_ROWS_KERNEL=0; step_table s8_off 540 --no-baselines --variants lyco $A)
(export LYCO_IA3_KEEP_OUTPUT_MIN_IN=0; step_table s8_min0 560 --no-baselines --variants lyco $A)
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records s8 s8_off s8_min0
pack_out

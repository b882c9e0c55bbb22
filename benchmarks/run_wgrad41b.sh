#!/usr/bin/env bash
# Issue 7, prepared in session 40 for the next: the final wgrad_triton.form at SDXL b1 — LoCon and LoKr on / off / on
# (the floor beside the first; run 289 before the bounds: LoCon 69.92 / 69.66 ms) — and the trainer's graphs against
# eager for lokr, locon and loha (check_cuda_graph sets LYCO_WGRAD_KERNEL=1 in both).
#   OUT=$OUT bash benchmarks/run_wgrad41b.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
aba LYCO_WGRAD_KERNEL 200 290 380 --jobs sdxl:1 $A --algos locon,lokr
graph_check 150 lokr,locon,loha
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2
pack_out

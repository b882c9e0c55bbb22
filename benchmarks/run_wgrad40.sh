#!/usr/bin/env bash
# Issue 7 GPU run of session 40: LYCO_WGRAD_KERNEL (wgrad_triton.py) — a conv down's ∂D in one Triton launch (implicit
# GEMM over the output positions, split K with a last-program sum) in place of the shifted copies, the batched GEMM, its
# batch sum and the tap flip, and of cuDNN's grouped-batch weight gradient on LoKr's delta-path downs. First the ∂D calls
# of SD1.5 b1 LoCon and LoKr steps alone (wgrad_kernel_bench.py: torch path against the kernel's geometries); then the
# step, SD1.5 b1 as given, LoKr, LoCon and LoHa on / off / on (the floor beside the first); then the trainer's graphs against
# eager for lokr, locon and loha.
#   OUT=$OUT bash benchmarks/run_wgrad40.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 200 python3 benchmarks/wgrad_kernel_bench.py --algos locon,lokr --batch 1 --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "bench rc=$? wall $(( $(date +%s) - S )) s"; grep -v Warn "$OUT/bench.log" | cut -c1-150 | head -120
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
aba LYCO_WGRAD_KERNEL 330 400 470 $A --algos lokr,locon,loha
[ $(( $(date +%s) - S )) -lt 470 ] && graph_check 110 lokr,locon,loha
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2
pack_out

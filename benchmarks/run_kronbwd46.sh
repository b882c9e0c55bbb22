#!/usr/bin/env bash
# Issue 7, prepared in session 45 for the next: change 172's 16384-element tile in the step (run 322 timed it alone
# only) and the dot form of the same backward (benchmarks/experiments/kron_bwd_dot.py, never run on a GPU).
# SDXL b1 LoKr as built (floor alongside) / two-read (kron_bwd_stacked.py --train) / as built / the dot form
# (kron_bwd_dot.py --train); SD1.5 b1 LoKr as built (floor alongside) / two-read; then the dot form alone against both
# launches at SDXL b1's four groups.
#   OUT=$OUT bash benchmarks/run_kronbwd46.sh      (carry .whl; ≈ 370 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr"
via() {  # via SCRIPT DIR DEADLINE args…: train_step.py through an experiment's --train (its launch in place)
  local e=$1 d=$2 t=$3
  shift 3
  mkdir -p $OUT/$d
  python3 benchmarks/experiments/$e --train "$@" --deadline $((S + t)) --out $OUT/$d > $OUT/$d/train_step.log 2>&1
  grep "^\[sd" $OUT/$d/train_step.log | cut -c1-175; echo "$d: wall $(( $(date +%s) - S )) s"
}
step_table x 80 $A --jobs sdxl:1 --baselines floor
via kron_bwd_stacked.py xold 120 $A --jobs sdxl:1 --no-baselines
step_table x2 160 $A --jobs sdxl:1 --no-baselines
via kron_bwd_dot.py xdot 200 $A --jobs sdxl:1 --no-baselines
step_table s 245 $A --jobs sd15:1 --baselines floor
via kron_bwd_stacked.py sold 275 $A --jobs sd15:1 --no-baselines
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x xold x2 xdot s sold
timeout 80 python3 benchmarks/experiments/kron_bwd_dot.py --out $OUT/kron_bwd_dot.json > $OUT/kron_bwd_dot.log 2>&1
echo "dot rc=$?"; grep "^{" $OUT/kron_bwd_dot.log | cut -c1-600
pack_out

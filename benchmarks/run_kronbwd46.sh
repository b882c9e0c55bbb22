#!/usr/bin/env bash
# Issue 7, prepared in session 45 for the next: change 172's 16384-element tile in the step (run 322 timed it alone
# only) and the dot form of the same backward (benchmarks/experiments/kron_bwd_dot.py, never run on a GPU).
# SDXL b1 LoKr as built (floor alongside) / two-read (kron_bwd_stacked.py --train) / as built; SD1.5 b1 LoKr as built
# (floor alongside) / two-read; then the dot form alone against both launches at SDXL b1's four groups.
#   OUT=$OUT bash benchmarks/run_kronbwd46.sh      (carry .whl; ≈ 330 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr"
old() {  # old DIR DEADLINE args…: train_step.py with the two-read launch
  local d=$1 t=$2
  shift 2
  mkdir -p $OUT/$d
  python3 benchmarks/experiments/kron_bwd_stacked.py --train "$@" --deadline $((S + t)) --out $OUT/$d \
    > $OUT/$d/train_step.log 2>&1
  grep "^\[sd" $OUT/$d/train_step.log | cut -c1-175; echo "$d: wall $(( $(date +%s) - S )) s"
}
step_table x 80 $A --jobs sdxl:1 --baselines floor
old xold 120 $A --jobs sdxl:1 --no-baselines
step_table x2 160 $A --jobs sdxl:1 --no-baselines
step_table s 205 $A --jobs sd15:1 --baselines floor
old sold 235 $A --jobs sd15:1 --no-baselines
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x xold x2 s sold
timeout 80 python3 benchmarks/experiments/kron_bwd_dot.py --out $OUT/kron_bwd_dot.json > $OUT/kron_bwd_dot.log 2>&1
echo "dot rc=$?"; grep "^{" $OUT/kron_bwd_dot.log | cut -c1-600
pack_out

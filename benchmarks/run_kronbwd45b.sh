#!/usr/bin/env bash
# Issue 7, session 45: change 172 as built — LoKr's stacked factor-batch backward reads ∂U once up to 256 rows of A
# (factor_triton._STACKED["max_rows"]), the two-read launch past it (run 321: the one-read launch lost on the
# 1280- and 640-row groups). SDXL b1 LoKr as built (floor alongside) / two-read everywhere / as built, then
# benchmarks/experiments/kron_bwd_stacked.py (both launches, the choice, other one-read geometries).
#   OUT=$OUT bash benchmarks/run_kronbwd45b.sh      (carry .whl; ≈ 220 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr --jobs sdxl:1"
step_table new 80 $A --baselines floor
mkdir -p $OUT/old
python3 benchmarks/experiments/kron_bwd_stacked.py --train $A --no-baselines --deadline $((S + 120)) \
  --out $OUT/old > $OUT/old/train_step.log 2>&1
grep "^\[sd" $OUT/old/train_step.log | cut -c1-175; echo "old: wall $(( $(date +%s) - S )) s"
step_table new2 160 $A --no-baselines
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records new old new2
timeout 50 python3 benchmarks/experiments/kron_bwd_stacked.py --out $OUT/kron_bwd.json > $OUT/kron_bwd.log 2>&1
echo "bench rc=$?"; grep "^{" $OUT/kron_bwd.log
pack_out

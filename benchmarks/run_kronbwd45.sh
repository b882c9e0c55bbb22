#!/usr/bin/env bash
# Issue 7, session 45: LoKr's stacked factor-batch backward reading ∂U once (factor_triton.kron_backward_batched,
# change 172). benchmarks/experiments/kron_bwd_stacked.py times the old and new launch at SDXL b1's groups, then SDXL
# b1 LoKr new (floor alongside) / old (the same script's --train: train_step.py with the old launch) / new, and the
# trainer's graphs against eager (lokr).
#   OUT=$OUT bash benchmarks/run_kronbwd45.sh      (carry .whl; ≈ 300 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 60 python3 benchmarks/experiments/kron_bwd_stacked.py --out $OUT/kron_bwd.json > $OUT/kron_bwd.log 2>&1
echo "bench rc=$?"; grep "^{" $OUT/kron_bwd.log
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr --jobs sdxl:1"
T=$(( $(date +%s) - S ))
step_table new $((T + 80)) $A --baselines floor
mkdir -p $OUT/old
python3 benchmarks/experiments/kron_bwd_stacked.py --train $A --no-baselines --deadline $((S + T + 120)) \
  --out $OUT/old > $OUT/old/train_step.log 2>&1
grep "^\[sd" $OUT/old/train_step.log | cut -c1-175; echo "old: wall $(( $(date +%s) - S )) s"
step_table new2 $((T + 160)) $A --no-baselines
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records new old new2
graph_check 110 lokr
pack_out

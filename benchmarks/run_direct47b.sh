#!/usr/bin/env bash
# Issue 7, prepared in session 46 for the next (not run): run_direct47.sh's A/B at SD1.5 b1 and b8 (inf / 0, the
# floor alongside the first), the trainer's CUDA graphs against eager for lokr-full with the direct form on, then
# both forms alone per layer shape (experiments/kron_direct_shapes.py: where the rows pay, for DIRECT_ROWS).
#   OUT=$OUT bash benchmarks/run_direct47b.sh      (carry .whl; ≈ 330 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr-full"
(export LYCO_LOKR_DIRECT_ROWS=inf; step_table sinf 60 $A --jobs sd15:1 --baselines floor)
(export LYCO_LOKR_DIRECT_ROWS=0; step_table s0 90 $A --jobs sd15:1 --no-baselines)
(export LYCO_LOKR_DIRECT_ROWS=inf; step_table s8inf 140 $A --jobs sd15:8 --baselines floor)
(export LYCO_LOKR_DIRECT_ROWS=0; step_table s80 170 $A --jobs sd15:8 --no-baselines)
(export LYCO_LOKR_DIRECT_ROWS=inf; graph_check 80 lokr-full)
timeout 120 python3 benchmarks/experiments/kron_direct_shapes.py --out $OUT/kron_direct_shapes.json \
  > $OUT/kron_direct_shapes.log 2>&1
echo "shapes rc=$?"; grep '"summed_ms' $OUT/kron_direct_shapes.log
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records sinf s0 s8inf s80
pack_out

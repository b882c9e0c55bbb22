#!/usr/bin/env bash
# Taken out after this run (session 48 review, NOTES row 180): LYCO_LOKR_DIRECT_FORM no longer exists; a record.
# Issue 7, prepared in session 47, run 334 (session 48): LoKr's direct factor gradients in the permuted form
# (lokr.kron_linear_grads_permuted: x and ∂y permuted once, every product one plain GEMM; LYCO_LOKR_DIRECT_FORM,
# `rows` by default) — first every form alone per layer shape (experiments/kron_direct_shapes.py: the ∂W′ path, the
# row form, the permuted form) and the ∂W′ path's reductions alone at several tiles and in a block form
# (experiments/kron_wgrad_tiles.py), then lokr-full in the step: SDXL b1 as built (floor alongside) / permuted on change
# 177's layers (P) / permuted on every linear layer (P, LYCO_LOKR_DIRECT_ROWS=inf, LYCO_LOKR_DIRECT_MIN=0),
# SD1.5 b1 as built / permuted on every linear layer.
#   OUT=$OUT bash benchmarks/run_perm51.sh      (carry .whl; ≈ 560 s and the start: run with timeout_s 600)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 150 python3 benchmarks/experiments/kron_direct_shapes.py --out $OUT/kron_direct_shapes.json \
  > $OUT/kron_direct_shapes.log 2>&1
echo "shapes rc=$? wall $(( $(date +%s) - S )) s"; grep '"summed_ms' $OUT/kron_direct_shapes.log
timeout 170 python3 benchmarks/experiments/kron_wgrad_tiles.py --out $OUT/kron_wgrad_tiles.json \
  > $OUT/kron_wgrad_tiles.log 2>&1
echo "wgrad tiles rc=$? wall $(( $(date +%s) - S )) s"; grep '"summed_ms' $OUT/kron_wgrad_tiles.log
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr-full"
P=LYCO_LOKR_DIRECT_FORM=permuted ALL="LYCO_LOKR_DIRECT_ROWS=inf LYCO_LOKR_DIRECT_MIN=0"
step_table x1 410 $A --jobs sdxl:1 --baselines floor
(export $P; step_table x1p 450 $A --jobs sdxl:1 --no-baselines)
(export $P $ALL; step_table x1pa 490 $A --jobs sdxl:1 --no-baselines)
step_table s1 515 $A --jobs sd15:1 --no-baselines
(export $P $ALL; step_table s1pa 540 $A --jobs sd15:1 --no-baselines)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x1 x1p x1pa s1 s1pa
pack_out

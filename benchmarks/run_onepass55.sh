#!/usr/bin/env bash
# Issue 7, prepared in session 48 for the next (not run): LoKr's ∂W′ reductions in one launch without partials
# (factor_triton._kron_wgrad_onepass, change 182; LYCO_KRON_WGRAD_ONEPASS = the largest K·C it takes, 0 by default) —
# first alone per layer shape beside the loop and block forms (experiments/kron_wgrad_tiles.py: six tile/warp
# configurations, never compiled for a GPU yet), then lokr-full in the step: SDXL b1 as built (floor alongside) /
# one-pass up to K·C = 65536 (P: by the factor-8 shapes, every linear layer but 1280 → 10240 and 5120 → 1280, and the
# 3×3 convs up to 640 channels) / as built, SD1.5 b1 as built / P / the block form's budget halved to 32 programs
# (M: LYCO_KRON_WGRAD_MIN_PROGRAMS=32, change 183), SD1.5 b8 and SDXL b4 as built / P; the trainer's graphs against
# eager with P and M.
# Ran as run 339 (session 49): the one-pass form lost alone and in the step and was taken out of the library after it
# (it lives in experiments/kron_wgrad_tiles.py, which this script still runs; LYCO_KRON_WGRAD_ONEPASS no longer exists,
# so P's legs now repeat the build); M is the default since (run 342).
#   OUT=$OUT bash benchmarks/run_onepass55.sh      (carry .whl; ≈ 520 s and the start: run with timeout_s 600)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
experiment 130 kron_wgrad_tiles
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr-full"
P=LYCO_KRON_WGRAD_ONEPASS=65536 M=LYCO_KRON_WGRAD_MIN_PROGRAMS=32
step_table x1 185 $A --jobs sdxl:1 --baselines floor
(export $P; step_table x1p 225 $A --jobs sdxl:1 --no-baselines)
step_table x1o 265 $A --jobs sdxl:1 --no-baselines
step_table s1 295 $A --jobs sd15:1 --no-baselines
(export $P; step_table s1p 325 $A --jobs sd15:1 --no-baselines)
(export $M; step_table s1m 365 $A --jobs sd15:1 --no-baselines)
step_table s8 400 $A --jobs sd15:8 --no-baselines
(export $P; step_table s8p 435 $A --jobs sd15:8 --no-baselines)
step_table x4 480 $A --jobs sdxl:4 --no-baselines
(export $P; step_table x4p 525 $A --jobs sdxl:4 --no-baselines)
(export $P $M; graph_check 60 lokr-full)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x1 x1p x1o s1 s1p s1m s8 s8p x4 x4p
pack_out

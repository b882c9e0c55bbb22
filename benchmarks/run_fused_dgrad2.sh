#!/usr/bin/env bash
# Change 132 is not in the tree: apply benchmarks/experiments/fused_dgrad.patch first (patch -p1), and run with
# LYCO_FUSED_DGRAD=graph (the patch leaves it off by default; the runs had it on by default).
# NB: run 233 (this script) ran with the kernels' self-test failing (a column-major case TMA cannot address): every row
# there is without both fused GEMMs; see NOTES change 132.
# Issue 7 GPU run 233 (session 31): the fused ∂x GEMM (change 132) with column-major ∂y (SDPA's ∂q/∂k; run 232's probe
# found the q/k/v groups falling back on it) — A/B/A at SD1.5 b1 LoRA beside PEFT and the floor, then on every row
# count up to 1280 inputs ("wide"); SDXL b1 on / off / wide; the probe; the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_fused_dgrad2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
J="--jobs sd15:1 --algos lora $A"
timeout 60 python3 benchmarks/experiments/dgrad_probe.py --no-shapes 2>&1 | grep "backward took" | sed 's/^/probe: /'
step_table on 150 --baselines floor --variants lyco,peft $J
(export LYCO_FUSED_DGRAD=0; step_table off 190 --no-baselines --variants lyco $J)
step_table on2 230 --no-baselines --variants lyco $J
(export LYCO_FUSED_DGRAD_ROWS=0 LYCO_FUSED_DGRAD_IN=1280; step_table wide 270 --no-baselines --variants lyco $J)
X="--jobs sdxl:1 --algos lora $A"
step_table x1 340 --no-baselines --variants lyco $X
(export LYCO_FUSED_DGRAD=0; step_table x1off 400 --no-baselines --variants lyco $X)
(export LYCO_FUSED_DGRAD_ROWS=0 LYCO_FUSED_DGRAD_IN=1280; step_table x1wide 460 --no-baselines --variants lyco $X)
graph_check 80 lora,lora-te
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2 wide x1 x1off x1wide
pack_out

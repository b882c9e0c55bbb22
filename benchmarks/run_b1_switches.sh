#!/usr/bin/env bash
# Issue 7 GPU run 200 (session 27): SD1.5 b1, where LoRA (0.844× PEFT) and LoCon (0.805×) still miss 0.8× — each
# captured-steps switch at 0 in turn (lyco's LoRA and LoCon), the defaults before and after, the floor and PEFT once:
# a path that pays at b8 may cost at b1, where each layer's fixed per-kernel cost and each cross-stream edge weigh more.
#   OUT=$OUT bash benchmarks/run_b1_switches.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --jobs sd15:1 --algos lora,locon"
step_table base 60 --baselines floor --variants lyco,peft $A
t=60
for v in LYCO_BYPASS_STREAMS LYCO_SIDE_SPLIT LYCO_MERGE_AHEAD LYCO_MERGE_KERNEL LYCO_FUSED_GEMM LYCO_FORWARD_SIDE \
         LYCO_SHARED_INPUT LYCO_INPUT_REGEN LYCO_NORM_REGEN LYCO_GEGLU_FUSE LYCO_CONV_EPILOGUE LYCO_CONV_NHWC \
         LYCO_TAPS_DOWN LYCO_CALLER_BACKWARD; do
  t=$((t + 25))
  (export $v=0; step_table "off_$v" $t --no-baselines --variants lyco $A)
done
(export LYCO_BYPASS_ROWS=1; step_table rows1 $((t + 25)) --no-baselines --variants lyco $A)
step_table base2 $((t + 50)) --no-baselines --variants lyco $A
(cd "$OUT" && for d in base off_* rows1 base2; do echo "$d"; done) | while read -r d; do step_records "$d"; done
pack_out

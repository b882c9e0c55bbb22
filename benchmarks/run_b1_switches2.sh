#!/usr/bin/env bash
# Issue 7 GPU run 201 (session 27): run 200 again with deadlines that let it finish (its legs took 20–50 s each and
# its deadlines cut all but five) — SD1.5 b1 LoRA and LoCon with each captured-steps switch left unmeasured there at 0
# (the conv paths, the side split, the merges ahead, the fused GEMM, the forward's side down, the regenerations), the
# defaults with the floor and PEFT first and lyco again last.
#   OUT=$OUT bash benchmarks/run_b1_switches2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --jobs sd15:1 --algos lora,locon"
step_table base 520 --baselines floor --variants lyco,peft $A
for v in LYCO_TAPS_DOWN LYCO_CONV_NHWC LYCO_CONV_WEIGHT_CL LYCO_DGRAD_WEIGHT_CL LYCO_SIDE_SPLIT LYCO_MERGE_AHEAD \
         LYCO_FUSED_GEMM LYCO_FORWARD_SIDE LYCO_NORM_REGEN LYCO_GEGLU_FUSE; do
  (export $v=0; step_table "off_$v" 520 --no-baselines --variants lyco $A)
done
step_table base2 540 --no-baselines --variants lyco $A
(cd "$OUT" && for d in base off_* base2; do echo "$d"; done) | while read -r d; do step_records "$d"; done
pack_out

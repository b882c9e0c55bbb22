#!/usr/bin/env bash
# Issue 7 GPU run 325 (session 46): SD1.5 b1 LoRA is 0.816× PEFT (run 324: 21.49 against 26.35 ms; goal 0.8×, 21.08)
# and 1.092× the floor. Which of the captured step's shape rules and trade-offs, as set, cost it time there: one leg
# per setting (lyco only), the default first and last, the floor and PEFT alongside the first.
#   OUT=$OUT bash benchmarks/run_sweep46.sh      (carry .whl; ≈ 380 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --algos lora --jobs sd15:1"
# run 325: the 60 s deadline left the PEFT leg out (the floor and lyco took it)
step_table d0 60 $A --variants lyco,peft --baselines floor
t=60
for kv in LYCO_MERGED_ROWS=2 LYCO_MERGED_ROWS=4 LYCO_MERGED_ROWS=inf LYCO_INPUT_REGEN=0 LYCO_NORM_REGEN=0 \
          LYCO_GEGLU_FUSE=0 LYCO_SIDE_SMS=48 LYCO_SIDE_SMS=16 LYCO_BLAS_CARVEOUT=8; do
  t=$((t + 30))
  (export "$kv"; k=${kv#LYCO_}; step_table "${k/=/_}" $t $A --variants lyco --no-baselines)
done
step_table d1 $((t + 30)) $A --variants lyco --no-baselines
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
for d in "$OUT"/*/; do step_records "$(basename "$d")"; done
pack_out

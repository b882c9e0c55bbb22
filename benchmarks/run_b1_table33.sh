#!/usr/bin/env bash
# Issue 7 GPU run 247 (session 33): SD1.5 b1 at this session's code — LoRA, LoCon, LoHa, LoKr against PEFT and the
# floor in one run (the ratios of the closing note); one LoRA replay's timeline (change 140: a split q/k/v group's ∂x
# reads the stacked downs its forward made — the cat kernels against run 243's); the trainer's graphs against eager
# for LoHa (its conv factors built, not leaves: change 138's sink does not take them) (≈ 5.5 min).
#   OUT=$OUT bash benchmarks/run_b1_table33.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
step_table t 220 --baselines floor --variants lyco,peft --jobs sd15:1 --algos lora,locon,loha,lokr \
  --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15
grep "÷best peer" "$OUT/t/train_step.log" | grep graph | cut -c1-160
step_table tr 270 --no-baselines --variants lyco --jobs sd15:1 --algos lora --rounds 1 --steps 2 --warmup 1 --graph \
  --graph-steps 15 --graph-trace lora/lyco
gzip "$OUT"/tr/graph_trace_*.json
python3 - "$OUT"/tr/graph_trace_sd15_b1_lora_lyco.json.gz <<'PY'
import sys; sys.path.insert(0, "benchmarks"); import graph_trace as g
ks = g.load(sys.argv[1]); print("cat kernels:", sum("CatArrayBatchedCopy" in k["n"] for k in ks), "of", len(ks))
PY
graph_check 60 loha
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records t tr
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 225 (session 30): lyco's real trainer (benchmarks/train_graph.py: bf16 with autocast, its default)
# on the SD1.5-sized UNet with (IA)³ and Diag-OFT (attn-mlp, text encoder trained), eager vs CUDA graph — the
# output-keeping ops now gate on the GEMM's dtype (change 130), so under autocast the layers reading a norm's fp32
# output take them in captured steps too; then the same with those ops off (LYCO_IA3_KEEP_OUTPUT=0,
# LYCO_OFT_KEEP_OUTPUT=0).
#   OUT=$OUT bash benchmarks/run_trainer_keep.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
BUDGET=150 bash benchmarks/run_train_graph.sh "$OUT/on" --models sd15 --algos ia3,diag-oft --warmup 4 --steps 12 \
  | grep -E 'ms/step|rel L2|eager vs|: (ok|fail)' | cut -c1-220
(export LYCO_IA3_KEEP_OUTPUT=0 LYCO_OFT_KEEP_OUTPUT=0
 BUDGET=150 bash benchmarks/run_train_graph.sh "$OUT/off" --models sd15 --algos ia3,diag-oft --warmup 4 --steps 12 \
  | grep -E 'ms/step|rel L2|eager vs|: (ok|fail)' | cut -c1-220)
echo "lyco warnings: $(grep -rh 'RuntimeWarning: lyco' $OUT 2>/dev/null | wc -l)"
cat "$OUT"/on/train_graph.md "$OUT"/off/train_graph.md 2>/dev/null | grep -E '^\| sd15'
pack_out

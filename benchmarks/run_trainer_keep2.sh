#!/usr/bin/env bash
# Issue 7 GPU run 226 (session 30): run 225's trainer rows with a second eager training as the noise reference
# (--eager-twice), (IA)³ and Diag-OFT with the output-keeping ops on (run 225's deadline left Diag-OFT out) and off,
# in one run (the card may differ from run 225's).
#   OUT=$OUT bash benchmarks/run_trainer_keep2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
BUDGET=200 bash benchmarks/run_train_graph.sh "$OUT/on" --models sd15 --algos diag-oft,ia3 --warmup 4 --steps 12 \
  --eager-twice | grep -E 'ms/step|rel L2|eager vs|: (ok|fail)' | cut -c1-260
(export LYCO_IA3_KEEP_OUTPUT=0 LYCO_OFT_KEEP_OUTPUT=0
 BUDGET=150 bash benchmarks/run_train_graph.sh "$OUT/off" --models sd15 --algos diag-oft,ia3 --warmup 4 --steps 12 \
  | grep -E 'ms/step|rel L2|eager vs|: (ok|fail)' | cut -c1-260)
echo "lyco warnings: $(grep -rh 'RuntimeWarning: lyco' $OUT 2>/dev/null | wc -l)"
grep -E '^\| sd15' "$OUT"/on/train_graph.md "$OUT"/off/train_graph.md
pack_out

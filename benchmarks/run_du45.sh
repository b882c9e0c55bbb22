#!/usr/bin/env bash
# Issue 7, session 45: benchmarks/experiments/lokr_du_forms.py (LoKr's rank-128 ∂U at SDXL b1 shapes: which GEMM
# forms launch cuBLAS's splitKreduce), then SDXL b1 with the floor: LoHa (not measured since change 170), LoRA at
# LYCO_MERGED_ROWS 0.5 / 0.3 / 0.75 (between 0.15: 67.20 and 0.75: 66.44, run 313 / 312).
#   OUT=$OUT bash benchmarks/run_du45.sh      (carry .whl; ≈ 230 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 60 python3 benchmarks/experiments/lokr_du_forms.py --out $OUT/du.json > $OUT/du.log 2>&1
echo "du rc=$? wall $(( $(date +%s) - S )) s"
python3 -c "
import json; r=json.load(open('$OUT/du.json'))
for x in r['records']: print(x['rows'], x['out'], x['form'], x.get('us'), x.get('rel_err'), x.get('error', ''), ' | '.join(k[:34] for k in x.get('kernels', [])))
" 2>&1 | cut -c1-220
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
T=$(( $(date +%s) - S ))
step_table loha $((T + 80)) $A --algos loha --jobs sdxl:1 --baselines floor
(export LYCO_MERGED_ROWS=0.5; step_table c05 $((T + 118)) $A --algos lora --jobs sdxl:1 --no-baselines)
(export LYCO_MERGED_ROWS=0.3; step_table c03 $((T + 156)) $A --algos lora --jobs sdxl:1 --no-baselines)
(export LYCO_MERGED_ROWS=0.75; step_table c075 $((T + 194)) $A --algos lora --jobs sdxl:1 --no-baselines)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records loha c05 c03 c075
pack_out

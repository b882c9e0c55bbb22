#!/usr/bin/env bash
# Issue 7 GPU run 173 (session 24): cuBLAS's workspace on lyco's side streams kept small (lowrank._side_blas,
# LYCO_SIDE_BLAS_WORKSPACE, 4 MiB by default; torch's is 32 MiB per (thread, stream) pair) and with it the forward's
# down beside the frozen GEMM by cuBLAS again (LYCO_FORWARD_SIDE, captured steps; run 171's form). First
# blas_workspace_bench.py (does this torch have the API; the memory per pair; the thin products' times per size),
# then the step as graphs: new / torch's workspace and no forward side (the previous tree) / small workspace alone /
# new, at SDXL b1, then SD1.5 b8 and b1 new / previous — times and the graphs' peaks.
#   OUT=$OUT bash benchmarks/run_side_ws.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 90 python3 benchmarks/blas_workspace_bench.py --out "$OUT" > "$OUT/blas_workspace.txt" 2>&1
echo "blas_workspace rc=$? wall $(( $(date +%s) - S )) s"; grep -v "^sd.*=.*=" "$OUT/blas_workspace.txt" | head -40
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
OLD="LYCO_SIDE_BLAS_WORKSPACE=torch LYCO_FORWARD_SIDE=0"
step_table x1_new 210 --jobs sdxl:1 --algos lora,locon --baselines floor $A
(export $OLD; step_table x1_old 265 --jobs sdxl:1 --algos lora --no-baselines $A)
(export LYCO_FORWARD_SIDE=0; step_table x1_ws 305 --jobs sdxl:1 --algos lora --no-baselines $A)
step_table x1_new2 345 --jobs sdxl:1 --algos lora --no-baselines $A
step_table s8_new 390 --jobs sd15:8 --algos lora --no-baselines $A
(export $OLD; step_table s8_old 430 --jobs sd15:8 --algos lora --no-baselines $A)
step_table s1_new 470 --jobs sd15:1 --algos lora --no-baselines $A
(export $OLD; step_table s1_old 505 --jobs sd15:1 --algos lora --no-baselines $A)
for d in x1_new x1_old x1_ws x1_new2 s8_new s8_old s1_new s1_old; do
  python3 -c "import json; r=json.load(open('$OUT/$d/train_step.json')); [print('$d', x['model'], x['batch'], x['algo'], x['variant'], 'graph', round(x.get('graph_median_ms') or 0, 2), 'peak', round(x.get('peak_gib') or 0, 3), 'graph_peak', round(x.get('graph_peak_gib') or 0, 3)) for x in r['records']]" 2>/dev/null
done
pack_out

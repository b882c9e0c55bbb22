#!/usr/bin/env bash
# Issue 7 GPU run 175 (session 24): after run 174 — (1) the trainer's captured steps against eager with the backward
# on the calling thread and the forward's down beside the frozen GEMM (check_cuda_graph.py); (2) the thin products'
# times at cuBLAS workspaces of 32, 4 and 1 MiB (blas_workspace_bench.py, one process per size through
# CUBLAS_WORKSPACE_CONFIG: torch 2.11 cannot set it per stream, run 173) and SDXL b1's floor and LoRA with every
# workspace at 4 MiB — what lowrank._side_blas's default would cost where torch can set it; (3) SD1.5 b8's LoCon,
# LoHa and LoKr rows with PEFT under train_step.py's per-configuration peaks (fresh_memory).
#   OUT=$OUT bash benchmarks/run_caller_backward2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 130 lora,lora-ckpt,locon,lokr,dora
echo "graph_check: wall $(( $(date +%s) - S )) s"
for c in :4096:8 :4096:1 :1024:1; do
  CUBLAS_WORKSPACE_CONFIG=$c timeout 40 python3 benchmarks/blas_workspace_bench.py --out "$OUT" > "$OUT/blas_workspace_$c.txt" 2>&1
  echo "blas $c rc=$?"; grep "summed" "$OUT/blas_workspace_$c.txt"
done
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
(export CUBLAS_WORKSPACE_CONFIG=:4096:1; step_table x1_ws4 260 --jobs sdxl:1 --algos lora --baselines floor --variants lyco $A)
step_table s8 420 --jobs sd15:8 --algos locon,loha,lokr --no-baselines --variants lyco,peft $A
for d in x1_ws4 s8; do
  python3 -c "import json; r=json.load(open('$OUT/$d/train_step.json')); [print('$d', x['model'], x['batch'], x['algo'], x['variant'], 'graph', round(x.get('graph_median_ms') or 0, 2), 'peak', round(x.get('peak_gib') or 0, 3), 'graph_peak', round(x.get('graph_peak_gib') or 0, 3)) for x in r['records']]" 2>/dev/null
done
pack_out

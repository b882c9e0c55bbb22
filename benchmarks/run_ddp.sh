#!/usr/bin/env bash
# DDP scaling for every process count this machine allows (1, 2, 4, 8 … up to the GPU count),
# for LoRA and LoKr, then the N-vs-1 equivalence and the summary table.
# usage: benchmarks/run_ddp.sh OUTDIR [algos] [per-gpu batch] [extra args for ddp_scaling.py]
set -euo pipefail
final=${1:-${OUT:-ddp_out}}; algos=${2:-lora,lokr}; batch=${3:-8}; extra=${4:-}
out=$(mktemp -d)   # adapters and per-run files stay here; the summary goes to $final
mkdir -p "$final"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
counts=1; n=2; while [ "$n" -le "$ngpu" ]; do counts="$counts $n"; n=$((n*2)); done
for algo in ${algos//,/ }; do
  for n in $counts; do
    if [ "$n" = 1 ]; then launch="accelerate launch --num_processes 1"; else launch="accelerate launch --multi_gpu --num_processes $n"; fi
    $launch --mixed_precision bf16 benchmarks/ddp_scaling.py --algo "$algo" --batch "$batch" --out "$out" $extra 2>&1 | grep -v Warning | tail -2
  done
done
python3 benchmarks/ddp_summary.py "$out"
cp "$out"/ddp_scaling.json "$out"/ddp_scaling.md "$final"/

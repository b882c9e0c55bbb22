#!/usr/bin/env bash
# Multi-GPU scaling of lyco training, one command: process counts 1, the GPU count, and the powers of
# two in between (in that order, so that a time budget keeps the most telling ones).
#   N = 1        SD1.5 LoRA/LoKr baselines (plain and pinned) and SDXL Full on one GPU
#   N = largest  every DDP variant (see ddp_scaling.py), the equivalence, SDXL Full: DDP vs FSDP
#   N between    the variants default, lyco, flat
# then ddp_summary.py → OUTDIR/ddp_scaling.md + ddp_scaling.json, with OUTDIR/ddp_log.txt and the
# per-count ddp_<N>.json (the equivalence tensors stay in a temporary folder).
#
# usage: [BUDGET=seconds] benchmarks/run_ddp.sh OUTDIR [extra arguments for ddp_scaling.py]
#        SMOKE=1 benchmarks/run_ddp.sh OUTDIR      # CPU, 2 gloo processes, tiny UNets (plumbing check)
# BUDGET: wall-clock seconds for everything; a launch gets what is left (less 30 s for the summary),
# one that cannot get 60 s is skipped, and each launch's JSON is written as it goes.
set -uo pipefail
final=${1:-${OUT:-ddp_out}}
shift || true
work=$(mktemp -d)
mkdir -p "$final"
start=$(date +%s)
deadline=$(( start + ${BUDGET:-1000000} ))
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then
  export ACCELERATE_USE_CPU=1
  ngpu=2
  set -- --smoke "$@"
else
  ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
fi
ncpu=$(python3 -c 'import os; print(len(os.sched_getaffinity(0)))')
# every process gets the same number of CPU threads in every launch (the machine's CPUs per GPU)
threads=$(( ncpu / ngpu )); [ "$threads" -ge 1 ] || threads=1
export OMP_NUM_THREADS=$threads
max=1; while [ $((max * 2)) -le "$ngpu" ]; do max=$((max * 2)); done
counts="1"; [ "$max" -gt 1 ] && counts="1 $max"
n=$((max / 2)); while [ "$n" -ge 2 ]; do counts="$counts $n"; n=$((n / 2)); done
for n in $counts; do
  left=$(( deadline - $(date +%s) - 30 ))
  if [ "$left" -lt 60 ]; then echo "=== $n process(es): skipped (time budget)" | tee -a "$final/ddp_log.txt"; continue; fi
  if [ "$n" = 1 ] || [ "$n" = "$max" ]; then args="--sdxl-full"; else args="--variants default,lyco,flat"; fi
  echo "=== $n process(es): $(date +%T), ${left}s left" | tee -a "$final/ddp_log.txt"
  timeout "$left" python3 -m torch.distributed.run --standalone --nproc_per_node "$n" benchmarks/ddp_scaling.py \
    --out "$work" --work "$work" $args "$@" 2>&1 | grep --line-buffered -v "Warning\|warnings.warn\|^$" \
    | tee -a "$final/ddp_log.txt" || echo "=== launch with $n process(es) failed or ran out of time" | tee -a "$final/ddp_log.txt"
done
cp "$work"/ddp_*.json "$final"/ 2>/dev/null
python3 benchmarks/ddp_summary.py "$work" "$final"
echo "=== done in $(( $(date +%s) - start ))s" | tee -a "$final/ddp_log.txt"

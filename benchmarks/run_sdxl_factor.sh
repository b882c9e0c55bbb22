#!/usr/bin/env bash
# Issue 7 GPU runs 60-61: SDXL, batch 4, 1024 px — LoHa and LoKr with the factor kernels
# (algorithms/factor_triton.py) and PEFT (run 60); the same two on the torch path (LYCO_TRITON=0, run 61:
# pass "torch" as $1). One eager round and one CUDA graph each.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_sdxl_factor.sh [torch]
. benchmarks/_gpu_lib.sh
if [ "${1:-}" = torch ]; then
  export LYCO_TRITON=0
  V="--variants lyco"
else
  V="--variants lyco,peft"
fi
python3 benchmarks/train_step.py --models sdxl --batches 4 --algos loha,lokr $V --steps 8 --warmup 2 \
  --graph --graph-steps 8 --baselines floor --deadline $((S + 540)) --out "$OUT" > "$OUT/train_step.log" 2>&1
grep "^\[sdxl" "$OUT/train_step.log" | cut -c1-175
echo "wall $(( $(date +%s) - S )) s"

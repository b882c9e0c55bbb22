#!/usr/bin/env bash
# Issue 7 GPU runs 50–51: the Triton TMA/persistent GEMM with the LoRA adapter fused (experiments/lowrank_gemm_tma.py)
# (run 51: also only its epilogue fused) against cuBLAS and torch's LoRA form at the SD1.5 b8 shapes
# (benchmarks/tma_gemm_bench.py).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_tma_gemm.sh
python3 benchmarks/tma_gemm_bench.py --out "$OUT" 2>&1 | tee "$OUT/tma_gemm_bench.log"

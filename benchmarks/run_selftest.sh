#!/usr/bin/env bash
# Issue 7 GPU runs 45 and 48: the kernels' self-test on first use (lowrank_triton._self_test; at ranks 8 and 64 since run 48,
# rank 128 refused; run 45 ran it before the rank argument) on the H100 — no warning, the
# kernels still taken (same graph times as runs 42 and 44) — and the trainer's CUDA graphs against eager on DoRA and
# GLoRA with it.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_selftest.sh
. benchmarks/_gpu_lib.sh
python3 - <<'PY'
import time, warnings, torch
from lyco.algorithms import lowrank_triton as K
w = torch.zeros(8, 8, device="cuda", dtype=torch.bfloat16)
with warnings.catch_warnings(record=True) as ws:
    warnings.simplefilter("always")
    t0 = time.perf_counter()
    ok = K.usable(w, 16)
    t1 = time.perf_counter()
    ok16 = K.usable(w.half(), 16)
    big = K.usable(w, 128)
    t2 = time.perf_counter()
print(f"usable bf16 {ok} ({t1 - t0:.2f} s, first use: compile + self-test), fp16 {ok16} ({t2 - t1:.2f} s), rank 128 {big}, "
      f"warnings {[str(x.message) for x in ws]}")
PY
graph_check 120 dora,dora-fp16,glora
step_table . 300 --models sd15 --batches 8 --algos dora,glora --variants lyco --baselines floor \
  --rounds 1 --steps 20 --warmup 4 --graph --graph-steps 15
grep -i "triton kernels are off" "$OUT/train_step.log" "$OUT/check_cuda_graph.log" || echo "no self-test warning"

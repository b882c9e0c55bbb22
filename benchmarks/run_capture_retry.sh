#!/usr/bin/env bash
# Issue 7 GPU runs 100-101 (run 100 before case names could repeat: three cases ran): a failed CUDA-graph capture tried once more (lyco/train/graphs.py, capture_retries) —
# the trainer's graphs against eager for the cases whose capture failed now and then (lokr-lowrank-ckpt, lokr),
# each several times in one process; "retried" in the JSON counts the second attempts.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_capture_retry.sh
. benchmarks/_gpu_lib.sh
graph_check 500 lokr-lowrank-ckpt,lokr-ckpt,lokr,lokr-lowrank-ckpt,lokr-ckpt,lokr-lowrank-ckpt,lokr-ckpt,lokr-lowrank-ckpt,lokr-ckpt,lokr-lowrank-ckpt
grep -o '"case": "[^"]*"\|"retried": [0-9]*\|"ok": [a-z]*' "$OUT/check_cuda_graph.log" | tr "\n" " "; echo
grep -c "capturing once more" "$OUT/check_cuda_graph.log"

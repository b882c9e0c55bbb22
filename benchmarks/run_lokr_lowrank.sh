#!/usr/bin/env bash
# Issue 7 GPU run 27: LoKr with a low-rank W2 trained as a LoRA (kron(W1, A·B) = kron(W1, A)·kron(I, B),
# lokr.py) — mode "auto" (the new path) against mode "rebuild" (the rebuilt op auto took before), LoCon
# (the same layer set as a plain LoRA), LoKr full-matrix and PEFT in the same run; eager (two rounds) and
# one CUDA graph; a profile of the new path.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_lokr_lowrank.sh
. benchmarks/_gpu_lib.sh
step_table . 420 --models sd15 --batches 8 --algos lokr,lokr-full,locon --variants lyco,lyco-rebuild,peft \
  --skip lokr-full/lyco-rebuild,locon/lyco-rebuild,locon/peft --rounds 2 --steps 20 --warmup 4 \
  --graph --graph-steps 15 --profile lokr/lyco,lokr/lyco-rebuild --profile-top 20

#!/usr/bin/env bash
# Issue 7 GPU run 118 (NOTES change 79): the README table's other lyco rows (LoKr full-matrix, DoRA, Diag-OFT, GLoRA,
# (IA)³, Full, BOFT) with lyco.optim.FlatAdamW, as graphs (run 79 measured them with torch's AdamW; its peers stand).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_flat_adamw3.sh
. benchmarks/_gpu_lib.sh
step_table table 300 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 \
  --algos lokr-full,dora,oft,glora,ia3,full,boft --variants lyco --baselines floor
pack_out

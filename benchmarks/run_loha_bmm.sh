#!/usr/bin/env bash
# Issue 7 GPU run 28: LoHa's Khatri–Rao products as bmm outer products (2 backward kernels per product
# instead of 4, loha.py) and LoKr's low-rank LoRA form (run 27) again, with PEFT / LyCORIS in the same run,
# eager (two rounds) and one CUDA graph; profiles of LoHa and DoRA (where DoRA's time over Full goes); the
# trainer's CUDA graphs against eager on the LoKr low-rank path and LoHa.
# The bmm form was measured slower and not kept (NOTES change 35): rerun now, this measures the broadcast multiplies.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_loha_bmm.sh
. benchmarks/_gpu_lib.sh
graph_check 150 lokr-lowrank,lokr-lowrank-ckpt,loha,loha-rebuild
step_table . 450 --models sd15 --batches 8 --algos loha,lokr,dora --variants lyco,peft,lycoris-eager \
  --skip lokr/lycoris-eager,loha/lycoris-eager,dora/peft --rounds 2 --steps 20 --warmup 4 \
  --graph --graph-steps 15 --profile loha/lyco,dora/lyco --profile-top 25

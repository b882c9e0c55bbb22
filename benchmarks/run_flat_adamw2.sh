#!/usr/bin/env bash
# Issue 7 GPU run 113 (NOTES change 79): FlatAdamW's flat gradient made per step (run 112 kept it between steps:
# +0.01–0.02 GiB of peak) — the table rows of LoRA, LoCon, LoHa and LoKr with PEFT in the same run (the README's),
# and the trainer's graphs against eager.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; OUT=$OUT bash benchmarks/run_flat_adamw2.sh
. benchmarks/_gpu_lib.sh
step_table table 260 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 \
  --algos lora,locon,loha,lokr --variants lyco,peft --baselines floor
graph_check 110 lora,locon,loha,lora-fp16
pack_out

#!/usr/bin/env bash
# Issue 7 GPU run 21: Diag-OFT/BOFT with every layer's Cayley inverse in one batched call per forward pass
# (oft._InverseBatch) against PEFT (two rounds, graph), BOFT (lyco only), and the trainer's CUDA graphs
# on them (a replay must redo the batched inverse with the current blocks: bit-level vs eager).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_oft3.sh
. benchmarks/_gpu_lib.sh
step_table . 220 --models sd15 --batches 8 --algos oft,boft \
  --variants lyco,peft --skip boft/peft --steps 20 --warmup 4 --graph --graph-steps 15 --rounds 2 --budget 200
graph_check 150 diag-oft,diag-oft-fp16,diag-oft-ckpt,boft

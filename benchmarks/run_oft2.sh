#!/usr/bin/env bash
# Issue 7 GPU run 18: Diag-OFT's rebuilt op after the Cayley change (inverse kept, A = R − I = 2QM; no
# second solve) against its delta path and PEFT (two rounds, graph); BOFT's row-order butterfly
# (butterfly_rows) against LyCORIS and PEFT (one round; graph for lyco); the trainer's cuda_graph on
# Diag-OFT/BOFT (eager vs graph, bit-level); the trainer's default cuda_graph = "auto" on a GPU.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_oft2.sh
. benchmarks/_gpu_lib.sh
step_table . 170 --models sd15 --batches 8 --algos oft \
  --variants lyco,lyco-bypass,peft --steps 20 --warmup 4 --graph --graph-steps 15 --rounds 2 --budget 150
step_table boft 330 --models sd15 --batches 8 --algos boft --no-baselines \
  --variants lyco,lycoris-eager,peft --steps 12 --warmup 3 --graph --graph-steps 10 --budget 150
graph_check 120 diag-oft,diag-oft-fp16,diag-oft-ckpt,boft
timeout 60 python3 -m lyco train examples/train_lokr.toml --max-train-steps 12 --output-dir /tmp/cg --overwrite \
  --no-progress-bar > "$OUT/train_auto.log" 2>&1
echo "lyco train rc=$?"; grep -i "cuda_graph\|error\|step" "$OUT/train_auto.log" | head -8 | cut -c1-200

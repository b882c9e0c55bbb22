#!/usr/bin/env bash
# Issue 7 GPU run 20: after the capture's empty_cache and the default cuda_graph = "auto": the trainer's
# graphs against eager on the tiny model for every algorithm family (bit-level, benchmarks/check_cuda_graph.py),
# and the trainer's step time eager vs graph at SD1.5 b8 LoRA (benchmarks/train_graph.py, peak memory
# with the capture's warm-up cache emptied).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_verify.sh
. benchmarks/_gpu_lib.sh
graph_check 260 lora,lora-accum2,lora-eval,locon,loha,lokr,dora,diag-oft,boft,glora,ia3,full
mkdir -p "$OUT/tg"
timeout 200 python3 benchmarks/train_graph.py --models sd15 --algos lora --out "$OUT/tg" > "$OUT/train_graph.log" 2>&1
echo "train_graph rc=$?"; tail -6 "$OUT/train_graph.log" | cut -c1-220
echo "wall $(( $(date +%s) - S )) s"

#!/usr/bin/env bash
# Issue 7 GPU run 131 (NOTES change 90): the op's backward no longer waits for its side-stream products where they all
# add into .grad (the sink: lyco train's linear LoRA layers) — the next backward nodes run beside them
# (lowrank._defer, LYCO_SIDE_DEFER). Not kept (no gain, +0.1 GiB): the change is benchmarks/experiments/side_defer.patch. The ops against float64 on the GPU with it (sink rows), then the real trainer
# (SD1.5-sized LoRA, graph) A/B/A with and without autocast, then the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_side_defer.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 90 python3 benchmarks/experiments/shared_input_check.py > "$OUT/shared_input_check.txt" 2>&1
echo "shared_input_check rc=$?"; grep -E "mixed|worst" "$OUT/shared_input_check.txt" | cut -c1-200
G="benchmarks/train_graph.py --models sd15 --algos lora --warmup 5 --steps 20"
trainer_row on-noac 60 $G --no-autocast
(export LYCO_SIDE_DEFER=0; trainer_row off-noac 60 $G --no-autocast)
trainer_row on2-noac 60 $G --no-autocast
trainer_row on-ac 60 $G
(export LYCO_SIDE_DEFER=0; trainer_row off-ac 60 $G)
graph_check 200 lora,lora-accum2,lora-te,lora-ckpt,lora-fp16,locon
pack_out

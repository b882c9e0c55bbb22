#!/usr/bin/env bash
# Issue 7 GPU run 127 (NOTES change 89): a self-attention's q/k/v (and a cross-attention's k/v) as one op (the record: its
# LYCO_SHARED_CAT leg measured a second forward form, taken out after this run)
# (lyco/siblings.py, algorithms/lowrank_shared.py). First the op on the GPU against float64 (shared_input_check.py);
# then SD1.5 b8 as graphs, A/B/A of LYCO_SHARED_INPUT (LoRA, LoCon; the floor alongside), LoRA with the cat form off;
# the real trainer (LoRA, with and without autocast) both ways; the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_shared_input.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 120 python3 benchmarks/experiments/shared_input_check.py > "$OUT/shared_input_check.txt" 2>&1
echo "shared_input_check rc=$?"; grep -v Warn "$OUT/shared_input_check.txt" | cut -c1-230
ARGS="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --algos lora,locon --variants lyco"
aba LYCO_SHARED_INPUT 120 190 260 $ARGS
(export LYCO_SHARED_CAT=0; step_table nocat 300 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph \
  --graph-steps 15 --algos lora --variants lyco --no-baselines)
trainer_row new-ac 60 benchmarks/train_graph.py --models sd15 --algos lora --warmup 5 --steps 20
(export LYCO_SHARED_INPUT=0; trainer_row off-ac 60 benchmarks/train_graph.py --models sd15 --algos lora --warmup 5 --steps 20)
trainer_row new-noac 60 benchmarks/train_graph.py --models sd15 --algos lora --warmup 5 --steps 20 --no-autocast
graph_check 100 lora,lora-ckpt,lora-te,locon
(export LYCO_SHARED_INPUT=0; trainer_row off-noac 60 benchmarks/train_graph.py --models sd15 --algos lora --warmup 5 --steps 20 --no-autocast)
pack_out

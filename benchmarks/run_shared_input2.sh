#!/usr/bin/env bash
# Issue 7 GPU run 128 (NOTES change 89, final form: the cat forward taken out): the shared-input op against float64
# on the GPU; the README's LoRA/LoCon/LoHa/LoKr rows with PEFT and the floor in one run; LoHa with the group off; the
# trainer's graphs against eager (check_cuda_graph.py now sets LYCO_SHARED_INPUT=1 for both runs, as it does for the
# other captured-steps paths — run 127's lora-te failure was its eager run without the group).
#   OUT=$OUT bash benchmarks/run_shared_input2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 90 python3 benchmarks/experiments/shared_input_check.py > "$OUT/shared_input_check.txt" 2>&1
echo "shared_input_check rc=$?"; grep -v Warn "$OUT/shared_input_check.txt" | cut -c1-230
step_table table 200 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 \
  --algos lora,locon,loha,lokr --variants lyco,peft --baselines floor
(export LYCO_SHARED_INPUT=0; step_table off 260 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph \
  --graph-steps 15 --algos loha,lora --variants lyco --no-baselines)
graph_check 200 lora,lora-te,lora-ckpt,lora-fp16,lora-accum2,loha
trainer_row sdxl-ac 90 benchmarks/train_graph.py --models sdxl --algos lora --warmup 3 --steps 10
pack_out

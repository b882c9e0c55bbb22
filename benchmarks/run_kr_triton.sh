#!/usr/bin/env bash
# Issue 7 GPU runs 53-54: LoHa's Khatri–Rao pair and LoKr's kron(W1, A) up as Triton kernels
# (algorithms/factor_triton.py) — the trainer's CUDA graphs against eager on them; the step as one CUDA graph
# with the kernels and on the torch path (LYCO_TRITON=0, same machine), a plain LoRA of LoHa's shapes
# (lora-kr, run 52), LoCon, and PEFT in the same run; a profile of LoHa and LoKr.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_kr_triton.sh
. benchmarks/_gpu_lib.sh
graph_check 120 loha,loha-rebuild,lokr-lowrank,lokr-lowrank-ckpt,lokr-fp16
X="python3 benchmarks/experiments/extra_algos.py --models sd15 --batches 8 --steps 12 --warmup 3 --graph --graph-steps 20"
mkdir -p "$OUT/torch"
LYCO_TRITON=0 $X --libs lyco --variants lyco --algos loha,lokr --baselines floor --deadline $((S + 250)) \
  --out "$OUT/torch" > "$OUT/torch/train_step.log" 2>&1
grep "^\[sd15" "$OUT/torch/train_step.log" | cut -c1-175
echo "torch path: wall $(( $(date +%s) - S )) s"
$X --libs lyco,peft --variants lyco,peft --algos loha,lokr,lora-kr,locon --skip locon/peft --baselines floor \
  --profile loha/lyco,lokr/lyco --profile-top 25 --deadline $((S + 540)) --out "$OUT" > "$OUT/train_step.log" 2>&1
grep "^\[sd15" "$OUT/train_step.log" | cut -c1-175
echo "wall $(( $(date +%s) - S )) s"

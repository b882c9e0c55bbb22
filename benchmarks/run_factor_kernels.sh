#!/usr/bin/env bash
# Issue 7 GPU runs 55-56: the Khatri–Rao / Kronecker kernels (algorithms/factor_triton.py) per launch geometry
# over SD1.5's LoHa / LoKr layers (benchmarks/factor_kernel_bench.py), then the trainer's CUDA graphs against
# eager and the step as one CUDA graph with the chosen geometry (LoHa, LoKr; lora-kr and LoCon for reference).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_factor_kernels.sh
. benchmarks/_gpu_lib.sh
python3 benchmarks/factor_kernel_bench.py --out "$OUT" 2>&1 | grep -v "float32: \[\]"
graph_check 100 loha,loha-rebuild,lokr-lowrank,lokr-fp16
python3 benchmarks/experiments/extra_algos.py --models sd15 --batches 8 --steps 12 --warmup 3 --graph --graph-steps 20 \
  --libs lyco --variants lyco --algos loha,lokr,lora-kr,locon --baselines floor --profile loha/lyco,lokr/lyco \
  --profile-top 25 --deadline $((S + 400)) --out "$OUT" > "$OUT/train_step.log" 2>&1
grep "^\[sd15" "$OUT/train_step.log" | cut -c1-175
echo "wall $(( $(date +%s) - S )) s"

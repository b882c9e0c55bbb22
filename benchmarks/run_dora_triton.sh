#!/usr/bin/env bash
# Issue 7 GPU run 38: DoRA-over-LoRA's rebuilt op on two fused Triton row kernels (algorithms/lowrank_triton.py: the
# build with its row norms, the backward's dgr/∂mag/H/∂U in one sweep pair) against the torch path of run 29
# (LYCO_TRITON=0, same run), LyCORIS (the best DoRA peer) and PEFT (detached norm, against lyco-dora-detach),
# eager (two rounds) and one CUDA graph, a profile; the trainer's CUDA graphs against eager on DoRA.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_dora_triton.sh
. benchmarks/_gpu_lib.sh
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)"
graph_check 120 dora,dora-fp16,dora-ckpt
(export LYCO_TRITON=0; step_table torch_path 210 --models sd15 --batches 8 --algos dora \
  --variants lyco,lyco-dora-detach --baselines floor --rounds 1 --steps 20 --warmup 4 --graph --graph-steps 15)
step_table . 560 --models sd15 --batches 8 --algos dora --variants lyco,lyco-dora-detach,peft,lycoris-eager \
  --rounds 2 --steps 20 --warmup 4 --graph --graph-steps 15 --profile dora/lyco --profile-top 25

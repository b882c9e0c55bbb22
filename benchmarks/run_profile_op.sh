#!/usr/bin/env bash
# Issue 7 GPU run 71: where the device time of a step with the bypass op goes. (1) The trainer's CUDA graphs against
# eager under fp16 autocast with the op in both (lora-fp16: the op under autocast, change 53, never run on a GPU);
# (2) per-kernel profiles of four SD1.5 b8 layers alone (a 1×1 conv proj_in, a linear of the same shape, the
# GEGLU projection, a 3×3 conv), delta path vs the op (benchmarks/experiments/bypass_op_layers.py --profile);
# (3) whole-step kernel profiles of the floor, LoRA, LoCon, LoHa, LoKr with the op and the factor kernels forced on
# in eager steps (LYCO_BYPASS_OP=1, LYCO_FACTOR_KERNELS=1): the same kernels a captured step runs.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_profile_op.sh
. benchmarks/_gpu_lib.sh
graph_check 100 lora-fp16
B=down_blocks.0.attentions.0
mkdir -p "$OUT/layers"
timeout 120 python3 benchmarks/experiments/bypass_op_layers.py --out "$OUT/layers" --profile \
  --only $B.proj_in,$B.transformer_blocks.0.attn1.to_q,$B.transformer_blocks.0.ff.net.0.proj,down_blocks.0.resnets.0.conv1 \
  > "$OUT/layers/log.txt" 2>&1
echo "layers rc=$? wall $(( $(date +%s) - S )) s"
export LYCO_BYPASS_OP=1 LYCO_FACTOR_KERNELS=1
step_table steps 420 --models sd15 --batches 8 --algos lora,locon,loha,lokr --variants lyco --baselines floor \
  --steps 6 --warmup 2 --profile floor/floor,lora/lyco,locon/lyco,loha/lyco,lokr/lyco --profile-top 80

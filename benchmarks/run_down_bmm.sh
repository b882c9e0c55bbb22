#!/usr/bin/env bash
# Issue 7 GPU run 35: the adapters' pointwise down projections (the 32 1×1 proj_in/proj_out convs of SD1.5's
# transformer blocks, and LoKr's grouped 1×1 downs) as one bmm instead of a cuDNN convolution (base.down_conv);
# LoRA/LoCon/LoHa/LoKr with PEFT in the same run, eager and one CUDA graph; the trainer's CUDA graphs against eager.
# The change was measured neutral and not kept (NOTES change 37): rerun now, this measures the code without it.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_down_bmm.sh
. benchmarks/_gpu_lib.sh
graph_check 100 lora,locon,lokr-lowrank
step_table . 300 --models sd15 --batches 8 --algos lora,locon,loha,lokr --variants lyco,peft --baselines floor \
  --steps 20 --warmup 4 --graph --graph-steps 15 --profile lora/lyco --profile-top 45

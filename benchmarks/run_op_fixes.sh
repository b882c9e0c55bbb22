#!/usr/bin/env bash
# Issue 7 GPU run 72: the bypass op after run 71's profile — its conv backward without the copy of ∂y that
# torch.matmul((r, o), (n, o, P)) made (∂h as a bmm with a stride-0 Uᵀ), and the concatenated GEMMs of wide linear
# layers (lowrank._cat_pays: GEGLU's projection, y = [x | h]·[W | s·U]ᵀ + b, [∂x | ∂h] = ∂y·[W′ | U]).
# (1) every SD1.5 b8 lin+conv layer alone, delta path vs the op forced on (and without the concatenation, and with
# cuDNN's ∂D), to redraw the shape rule (1×1 convs lost before the copy was found); (2) kernel profiles of three of
# them; (3) SD1.5 b8 LoRA, LoCon, LoHa, LoKr as CUDA graphs with the floor.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_op_fixes.sh
. benchmarks/_gpu_lib.sh
mkdir -p "$OUT/layers" "$OUT/prof"
timeout 230 python3 benchmarks/experiments/bypass_op_layers.py --out "$OUT/layers" > "$OUT/layers/log.txt" 2>&1
echo "layers rc=$? wall $(( $(date +%s) - S )) s"; grep -v "layers, " "$OUT/layers/log.txt" | tail -4
B=down_blocks.0.attentions.0
timeout 60 python3 benchmarks/experiments/bypass_op_layers.py --out "$OUT/prof" --profile \
  --only $B.proj_in,$B.transformer_blocks.0.ff.net.0.proj,down_blocks.0.resnets.0.conv1 > "$OUT/prof/log.txt" 2>&1
echo "prof rc=$? wall $(( $(date +%s) - S )) s"; grep "^== " "$OUT/prof/log.txt"
step_table steps 540 --models sd15 --batches 8 --algos lora,locon,loha,lokr --variants lyco --baselines floor \
  --rounds 1 --steps 4 --warmup 2 --graph --graph-steps 20

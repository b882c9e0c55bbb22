#!/usr/bin/env bash
# Issue 7 GPU run 67: the low-rank bypass op with run 66's shape rule (positions ≥ out·∏k, never 1×1 convs;
# lyco/algorithms/lowrank.py bypass_pays) in captured steps: the trainer's CUDA graphs against eager with the op in
# both (check_cuda_graph sets LYCO_BYPASS_OP=1), then SD1.5 b8 LoRA, LoCon, LoHa with PEFT alongside, one eager
# round and one CUDA graph, and the same three lyco rows without the op (LYCO_BYPASS_OP=0) in the same run.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_bypass_rule.sh
. benchmarks/_gpu_lib.sh
graph_check 110 lora,locon,loha
ARGS="--models sd15 --batches 8 --algos lora,locon,loha --baselines floor --rounds 1 --steps 8 --warmup 2
  --graph --graph-steps 30"
step_table rule 330 $ARGS --variants lyco,peft
(export LYCO_BYPASS_OP=0; step_table off 500 $ARGS --variants lyco)
step_table rule2 560 $ARGS --variants lyco --no-baselines

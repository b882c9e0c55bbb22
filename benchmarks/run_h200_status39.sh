#!/usr/bin/env bash
# Issue 7 GPU run of session 39, the first on an H200 since run 23 (this session lends no H100): the goal's batch-1
# floor ratios on this card, in one run — SD1.5 b1 floor, LoRA, LoCon, LoKr as given and on the frozen conv layout
# (the floor's and LoKr's timelines with every launching op of the conversion and elementwise kernels: LoKr's extra
# adapter time on the layout, session 38's lead 4), PEFT's LoRA at SD1.5 b1 both ways, SDXL b1 floor, LoRA, LoCon,
# LoKr as given.
#   OUT=$OUT bash benchmarks/run_h200_status39.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
M="elementwise_kernel<128,nchwToNhwc,nhwcToNchw,_build_kernel,_taps_build_kernel,reduce_kernel,CatArrayBatchedCopy"
T="--graph-trace floor/floor,lokr/lyco --graph-makers $M --graph-makers-top 0"
step_table asis 150 $A --jobs sd15:1 --variants lyco --baselines floor --algos lora,locon,lokr $T
step_table rule 250 $A --jobs sd15:1 --variants lyco --baselines floor --algos lora,locon,lokr --frozen-cl rule $T
step_table peft 300 $A --jobs sd15:1 --variants peft --no-baselines --algos lora
step_table peftrule 340 $A --jobs sd15:1 --variants peft --no-baselines --algos lora --frozen-cl rule
step_table xl1 480 $A --jobs sdxl:1 --variants lyco --baselines floor --algos lora,locon,lokr
gzip "$OUT"/*/graph_trace_*.json
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records asis rule peft peftrule xl1
pack_out

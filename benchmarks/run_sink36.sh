#!/usr/bin/env bash
# Issue 7 GPU run of session 36: LoKr's grouped linear downs' ∂B added into .grad by their GEMM under the grad sink
# (change 152) — SD1.5 b1 LoKr with the sink and without it in one run (run 264: 27.48 and 26.97 ms before it), LoHa
# with the sink (change 151's tail on; run 264 had it off only).
#   OUT=$OUT bash benchmarks/run_sink36.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
step_table sink 150 $A --baselines floor --algos lokr,loha --lyco-grad-sink
step_table nosink 200 $A --no-baselines --algos lokr
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records sink nosink
pack_out

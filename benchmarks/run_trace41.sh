#!/usr/bin/env bash
# Issue 7 GPU run of session 41: SD1.5 b1 as given with the conv weight-gradient kernel (changes 163–164) — the floor's,
# LoKr's and LoCon's timelines with the launching ops of the adapter's largest kernel kinds in run 279's LoKr − floor
# difference (the small cuBLAS GEMMs and their split-K reduces, the merge builds, the up adds, sm80 fprop convs, the
# batch sums, memsets, the wgrad kernel): where LoKr's last 0.03 ms over 1.30× and LoCon's over 1.10× might come from.
#   OUT=$OUT bash benchmarks/run_trace41.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
M="nvjet_sm90_tst,splitKreduce,_build_kernel,_up_add_kernel,sm80_xmma_fprop,reduce_kernel,Memset,_wgrad,nchwToNhwc,elementwise_kernel<128"
T="--graph-trace floor/floor,lokr/lyco,locon/lyco --graph-makers $M --graph-makers-top 0"
step_table asis 260 $A --jobs sd15:1 --variants lyco --baselines floor --algos lokr,locon $T
gzip "$OUT"/*/graph_trace_*.json
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records asis
pack_out

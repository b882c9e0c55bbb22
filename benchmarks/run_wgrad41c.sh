#!/usr/bin/env bash
# Issue 7 GPU run of session 41 (run 293; ran with results/run293_h200_wgrad_prefetch41/prefetch.patch applied, not
# kept — without it the bench has no prefetch configs and LYCO_WGRAD_PREFETCH does nothing): the conv weight-gradient
# kernel's K blocks loaded ahead (wgrad_triton PREFETCH, LYCO_WGRAD_PREFETCH) — run 292's SD1.5 b1 LoKr trace put `_wgrad_tap_kernel` first among the adapter's kernels
# (75×, 1.24 ms, 0.82 exposed); its ∂h gather is scalar loads the compiler cannot make asynchronous, so each K block
# waited out a load's latency. The ∂D calls alone (0, 1, 2 ahead; two other tiles), then SD1.5 b1 LoKr, LoCon, LoHa
# with the better of 1 and 2 ahead / none / again (the floor beside the first).
#   OUT=$OUT bash benchmarks/run_wgrad41c.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 200 python3 benchmarks/wgrad_kernel_bench.py --algos locon,lokr --batch 1 --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "bench rc=$? wall $(( $(date +%s) - S )) s"; grep -v Warn "$OUT/bench.log" | cut -c1-150 | head -120
PF=$(python3 -c "import json; a=json.load(open('$OUT/bench/wgrad_kernel_bench.json'))['algos']; t=lambda c: sum(v['configs'][c]['us'] for v in a.values()); print(2 if t('pf2') < t('pf1') else 1)" 2>/dev/null || echo 1)
echo "prefetch for the step: $PF"
export LYCO_WGRAD_PREFETCH=$PF
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
aba LYCO_WGRAD_PREFETCH 330 400 470 $A --algos lokr,locon,loha
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2
pack_out

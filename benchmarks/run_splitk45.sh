#!/usr/bin/env bash
# Issue 7, session 45: which products launch SDXL b1 LoKr's extra split-K GEMMs and splitKreduce kernels (run 300:
# +944 splitKreduce over LoRA, 3.59 ms exposed). Run 315 found LoKr's rank-128 ∂U splitting only at (4096, 640).
# benchmarks/experiments/makers_as_captured.py: the makers' eager step with the capture flag answering True (the
# side SM target, the factor batch take their captured forms); the traced replays count the captured kernels.
#   OUT=$OUT bash benchmarks/run_splitk45.sh      (carry .whl; ≈ 150 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
mkdir -p $OUT/t; ALGOS=${ALGOS:-lora,lokr}
python3 benchmarks/experiments/makers_as_captured.py --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 \
  --variants lyco --algos ${ALGOS:-lora,lokr} --jobs sdxl:1 --no-baselines --graph-trace lora/lyco,lokr/lyco \
  --graph-makers splitKreduce,splitK --graph-makers-top 40 --deadline $((S + ${SECS:-240})) --out $OUT/t > $OUT/t/train_step.log 2>&1
echo "rc=$? wall $(( $(date +%s) - S )) s"
grep "^\[sd" $OUT/t/train_step.log | cut -c1-175
for a in ${ALGOS//,/ }; do
  f=$OUT/t/graph_trace_sdxl_b1_${a}_lyco.json
  python3 -c "
import json, collections; ks=json.load(open('$f'))['kernels']
c=collections.Counter(k['n'][:70] for k in ks if 'splitK' in k['n'])
print('$a traced splitK kernels', sum(c.values())); [print('  ', n, v) for v, n in sorted(((v, n) for n, v in c.items()), reverse=True)[:12]]"
  echo "$a makers:"; cut -c1-330 $OUT/t/graph_trace_sdxl_b1_${a}_lyco.makers.txt | head -60
done
pack_out

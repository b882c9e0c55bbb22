#!/usr/bin/env bash
# Issue 7 GPU run 169 (session 23): change 111, the wide linear layers' backward weight [W′ | U] out of the merge
# kernel's one launch (no torch.cat copy of W′ after it), A/B/A against the previous lowrank.py (swapped in); and the
# merge kernel's own tile (lowrank_triton._MERGE_CFG): benchmarks/merge_kernel_bench.py over SDXL's and SD1.5's merge
# shapes first, then the step with the configuration that added least beside the GEMM chain at SDXL lin (picked here,
# written into the tree's lowrank_triton.py for those legs only). Before the run:
#   mkdir -p benchmarks/.prev && git show HEAD:src/lyco/algorithms/lowrank.py > benchmarks/.prev/lowrank.py
#   OUT=$OUT bash benchmarks/run_merge_tile.sh      (carry .whl and benchmarks/.prev)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
mkdir -p $OUT/mkb
timeout 150 python3 benchmarks/merge_kernel_bench.py --out $OUT/mkb 2>&1 | grep -v Warn | tee $OUT/mkb/log.txt
echo "merge bench wall $(( $(date +%s) - S )) s"
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
D=src/lyco/algorithms
cp $D/lowrank.py /tmp/lowrank_new.py
cp $D/lowrank_triton.py /tmp/lowrank_triton_new.py
PICK=$(python3 - <<'PY'
import json
import os
r = json.load(open(os.environ["OUT"] + "/mkb/merge_kernel_bench.json"))
c = r["sets"]["sdxl:lin:r16"]["configs"]
best = min(c, key=lambda k: c[k]["beside_ms"])
cfg = dict(c[best]["cfg"])
cfg["programs"] = None if cfg["programs"] == 4 else cfg["programs"] * 132
print(best, repr(cfg))
PY
)
echo "picked: $PICK"
CFG=${PICK#* }
[ -n "$PICK" ] || CFG="dict(_CFG)"
python3 - "$CFG" <<'PY'
import sys
p = "/tmp/lowrank_triton_tile.py"
s = open("/tmp/lowrank_triton_new.py").read()
assert "_MERGE_CFG = dict(_CFG)\n" in s
open(p, "w").write(s.replace("_MERGE_CFG = dict(_CFG)\n", "_MERGE_CFG = " + sys.argv[1] + "\n"))
PY
grep -n "^_MERGE_CFG" /tmp/lowrank_triton_tile.py
old() { cp benchmarks/.prev/lowrank.py $D/lowrank.py; cp /tmp/lowrank_triton_new.py $D/lowrank_triton.py; }
new() { cp /tmp/lowrank_new.py $D/lowrank.py; cp /tmp/lowrank_triton_new.py $D/lowrank_triton.py; }
tile() { cp /tmp/lowrank_new.py $D/lowrank.py; cp /tmp/lowrank_triton_tile.py $D/lowrank_triton.py; }
step_table x1_new 260 --jobs sdxl:1 --algos lora,locon --baselines floor $A
old; step_table x1_old 300 --jobs sdxl:1 --algos lora --no-baselines $A
tile; step_table x1_tile 350 --jobs sdxl:1 --algos lora,locon --no-baselines $A
new; step_table x1_new2 380 --jobs sdxl:1 --algos lora --no-baselines $A
step_table s8_new 410 --jobs sd15:8 --algos lora --no-baselines $A
tile; step_table s8_tile 435 --jobs sd15:8 --algos lora --no-baselines $A
step_table x4_tile 470 --jobs sdxl:4 --algos lora --no-baselines $A
new; step_table x4_new 510 --jobs sdxl:4 --algos lora --no-baselines $A
new
pack_out

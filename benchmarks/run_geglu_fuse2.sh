#!/usr/bin/env bash
# Issue 7 GPU run 196 (session 27): change 120's kernel — its tile swept around run 195's best; gradients on the real
# SD1.5 config with the fused backward's torch form (bitwise) and its kernel against the same step in fp32.
#   OUT=$OUT bash benchmarks/run_geglu_fuse2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
mkdir -p "$OUT/bench"
timeout 300 python3 benchmarks/experiments/geglu_bwd_bench.py "$OUT/bench" > "$OUT/bench/log.txt" 2>&1
echo "geglu_bwd_bench rc=$? wall $(( $(date +%s) - S )) s"; grep -E "^sd15|^sdxl|Error|error" "$OUT/bench/log.txt" | grep -v "per setting" | cut -c1-300
python3 - "$OUT/bench/geglu_bwd.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keys = [k for k in r["sizes"]["sd15_b8"]["sum_us"] if k.startswith("fused")]
tot = {k: (r["sizes"]["sd15_b8"]["sum_us"][k], r["sizes"]["sdxl_b4"]["sum_us"][k]) for k in keys}
for k, (a, b) in sorted(tot.items(), key=lambda kv: kv[1][0] / 1787.9 + kv[1][1] / 8125.1)[:12]:
    i = int(k[5:k.index("_")])
    print(k, r["configs"][i], "sd15_b8 %.1f sdxl_b4 %.1f" % (a, b))
PY
regen_check 200 lora,loha
pack_out

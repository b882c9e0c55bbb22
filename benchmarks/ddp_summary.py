"""Summarise ddp_scaling.py runs: throughput, scaling efficiency, N-vs-1 adapter equivalence."""

import glob
import json
import os
import sys

import torch
from safetensors.torch import load_file

out = sys.argv[1]
rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "ddp_*.json")))]
res = {"runs": rows, "scaling": [], "equivalence": []}
lines = ["| algo | GPUs | per-GPU batch | images/s | step ms | efficiency | peak GiB | card |",
         "|---|---|---|---|---|---|---|---|"]
for algo in sorted({r["algo"] for r in rows}):
    rs = sorted([r for r in rows if r["algo"] == algo], key=lambda r: r["processes"])
    base = next((r for r in rs if r["processes"] == 1), None)
    ref = os.path.join(out, f"adapter_{algo}_1.safetensors")
    for r in rs:
        eff = r["images_per_s"] / (r["processes"] * base["images_per_s"]) if base else None
        res["scaling"].append({"algo": algo, "processes": r["processes"], "efficiency": eff})
        lines.append(f"| {algo} | {r['processes']} | {r['per_process_batch']} | {r['images_per_s']:.1f} | "
                     f"{r['step_ms']:.1f} | {eff:.3f} | {r['peak_gib'] or 0:.2f} | {r['device']} |"
                     if eff is not None else f"| {algo} | {r['processes']} | … | {r['images_per_s']:.1f} | | | | |")
        other = os.path.join(out, f"adapter_{algo}_{r['processes']}.safetensors")
        if r["processes"] > 1 and os.path.exists(ref) and os.path.exists(other):
            a, b = load_file(ref), load_file(other)
            num = sum(float((a[k] - b[k]).float().norm() ** 2) for k in a) ** 0.5
            den = sum(float(a[k].float().norm() ** 2) for k in a) ** 0.5
            res["equivalence"].append({"algo": algo, "processes": r["processes"], "rel_error_vs_1gpu": num / den})
lines.append("")
for e in res["equivalence"]:
    lines.append(f"equivalence {e['algo']} {e['processes']} GPUs vs 1: relative L2 difference of the adapter after "
                 f"the same global batches = {e['rel_error_vs_1gpu']:.2e}")
md = "\n".join(lines)
print(md)
json.dump(res, open(os.path.join(out, "ddp_scaling.json"), "w"), indent=1)
open(os.path.join(out, "ddp_scaling.md"), "w").write(md + "\n")

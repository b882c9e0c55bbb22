"""Summarise ``ddp_scaling.py`` launches: throughput and scaling efficiency per DDP variant, the
N-vs-1 equivalence, communication alone, SDXL Full under DDP and FSDP.

    python3 benchmarks/ddp_summary.py WORK [OUT]     # WORK holds ddp_<N>.json and the equivalence tensors

Writes ``OUT/ddp_scaling.json`` and ``OUT/ddp_scaling.md`` (OUT defaults to WORK).

Efficiency = images/s on N processes / (N × images/s of the 1-process baseline at the same
per-process batch); each variant is compared with the 1-GPU baseline of the same suffixes (``lyco+pin`` with ``none+pin``, ``flat+graph`` with ``none+graph``).

Equivalence, bf16 tolerance: the N-process gradient averages N bf16-autocast passes over slices of
the global batch, the 1-process one is one pass over all of it; the same math, rounded differently
(bf16 keeps 8 significant bits: a unit roundoff of 2^-8 ≈ 3.9e-3 per operation). Stated tolerance:
relative L2 difference ≤ 2^-5 ≈ 3.1e-2 (8 bf16 roundoffs) for the first gradient, and ≤ 1e-3 for the
adapter after a few AdamW steps from the same start (fp32 parameters). With ``--smoke`` (fp32 on the
CPU) the differences are ~1e-6.
"""

from __future__ import annotations

import glob
import json
import os
import sys

GRAD_TOL = 2.0 ** -5
ADAPTER_TOL = 1e-3


def _gib(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def rel_l2(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in b)
    den = sum(float(b[k].double().norm() ** 2) for k in b)
    return (num / den) ** 0.5 if den else float("nan")


def rel_vec(a: list, b: list) -> float:
    num = sum((x - y) ** 2 for x, y in zip(a, b))
    den = sum(y * y for y in b)
    return (num / den) ** 0.5 if den else float("nan")


def main(work: str, out: str) -> str:
    from safetensors.torch import load_file

    launches = {}
    for p in sorted(glob.glob(os.path.join(work, "ddp_*.json"))):
        if not os.path.basename(p)[4:-5].isdigit():  # ddp_<N>.json only
            continue
        d = json.load(open(p))
        launches[d["meta"]["processes"]] = d
    if not launches:
        raise SystemExit(f"no ddp_<N>.json in {work}")
    meta = {n: d["meta"] for n, d in launches.items()}
    card = next(iter(meta.values()))["device"]
    rows = [r for d in launches.values() for r in d["runs"]]
    base = {(r["algo"], r["variant"]): r for r in rows if r["processes"] == 1}
    res = {"meta": meta, "scaling": [], "equivalence": [], "comm": [], "sdxl_full": [],
           "tolerance": {"gradient_rel_l2": GRAD_TOL, "adapter_rel_l2": ADAPTER_TOL}}

    lines = [f"# Multi-GPU scaling — {card}", ""]
    m_any = meta[max(meta)]
    lines.append(f"torch {m_any.get('torch')}, NCCL {m_any.get('nccl', '—')}, {m_any.get('gpus_on_machine', '—')} GPUs on "
                 f"the machine, peer access {m_any.get('peer_access', '—')}, {m_any.get('cpus_per_process')} CPU threads "
                 f"per process (OMP_NUM_THREADS={m_any.get('omp_num_threads')}).")
    smoke = any(m.get("smoke") for m in meta.values())
    model = "tiny UNet (--smoke, fp32, CPU)" if smoke else "SD1.5-sized UNet (random weights, bf16, frozen)"
    lines += ["", f"## {model}, adapter fp32 + bf16 autocast, per-GPU batch "
              f"{rows[0]['per_process_batch'] if rows else '—'}", "",
              "host ms = CPU time to queue forward + backward (until the step's first host sync); close to "
              "step ms means the step is bound by the CPU launching kernels.", "",
              "| algo | variant | GPUs | images/s | step ms | host ms | efficiency | peak GiB | card |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["algo"], r["processes"], r["variant"])):
        v = r["variant"]  # each variant against the 1-GPU run with the same suffixes (+pin, +graph)
        ref = base.get((r["algo"], "none" + v[len(v.split("+")[0]):]))
        eff = r["images_per_s"] / (r["processes"] * ref["images_per_s"]) if ref else None
        res["scaling"].append({"algo": r["algo"], "variant": r["variant"], "processes": r["processes"],
                               "images_per_s": r["images_per_s"], "step_ms": r["step_ms"], "efficiency": eff,
                               "host_fwd_bwd_ms": r.get("host_fwd_bwd_ms"), "peak_gib": r.get("peak_gib")})
        host = r.get("host_fwd_bwd_ms")
        lines.append(f"| {r['algo']} | {r['variant']} | {r['processes']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | "
                     f"{'' if host is None else f'{host:.1f}'} | {'' if eff is None else f'{eff:.3f}'} | "
                     f"{_gib(r.get('peak_gib'))} | {r['device']} |")

    lines += ["", f"## Equivalence: N GPUs vs 1 on the same global batch (tolerance: first gradient ≤ {GRAD_TOL:.1e}, "
              f"adapter after the AdamW steps ≤ {ADAPTER_TOL:.0e}, relative L2)", "",
              "| algo | variant | GPUs | gradient rel. L2 | adapter rel. L2 | within tolerance |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["algo"], r["processes"], r["variant"])):
        n, algo, v = r["processes"], r["algo"], r["variant"]
        if n == 1:
            continue
        f = {k: os.path.join(work, f"{k}_{algo}_{v}_{n}.safetensors") for k in ("grad", "adapter")}
        f1 = {k: os.path.join(work, f"{k}_{algo}_none_1.safetensors") for k in ("grad", "adapter")}
        if not all(os.path.exists(x) for x in (*f.values(), *f1.values())):
            continue
        g = rel_l2(load_file(f["grad"]), load_file(f1["grad"]))
        ad = rel_l2(load_file(f["adapter"]), load_file(f1["adapter"]))
        ok = g <= GRAD_TOL and ad <= ADAPTER_TOL
        res["equivalence"].append({"algo": algo, "variant": v, "processes": n, "gradient_rel_l2": g,
                                   "adapter_rel_l2": ad, "within_tolerance": ok})
        lines.append(f"| {algo} | {v} | {n} | {g:.2e} | {ad:.2e} | {'yes' if ok else 'NO'} |")

    comm = [dict(c, processes=n) for n, d in launches.items() for c in d.get("comm", [])]
    if comm:
        res["comm"] = comm
        lines += ["", "## All-reduce alone (fp32, median of 10)", "", "| GPUs | what | MiB | ms | bus GB/s |",
                  "|---|---|---|---|---|"]
        for c in comm:
            lines.append(f"| {c['processes']} | {c['what']} | {c['bytes'] / 2**20:.1f} | {c['all_reduce_ms']:.3f} | "
                         f"{c['bus_GBps']:.1f} |")

    sx = [r for d in launches.values() for r in d.get("sdxl_full", [])]
    if sx:
        one = next((r for r in sx if r["processes"] == 1 and r.get("fits")), None)
        px = next((r.get("resolution_px") for r in sx if r.get("resolution_px")), "—")
        name = "tiny SDXL UNet (--smoke)" if smoke else "SDXL-sized UNet (random weights, bf16)"
        lines += ["", f"## {name}, Full (a trainable fp32 copy of every attn/MLP weight), {px} px", "",
                  "| strategy | GPUs | per-GPU batch | images/s | efficiency | peak GiB per GPU | card |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(sx, key=lambda r: (r["processes"], r["strategy"])):
            if not r.get("fits", True):
                lines.append(f"| {r['strategy']} | {r['processes']} | {r['per_process_batch']} | does not fit | | | "
                             f"{r['device']} |")
                res["sdxl_full"].append({k: v for k, v in r.items() if k != "fingerprint"})
                continue
            eff = (r["images_per_s"] / (r["processes"] * one["images_per_s"])
                   if one and one["per_process_batch"] == r["per_process_batch"] else None)
            res["sdxl_full"].append({**{k: v for k, v in r.items() if k != "fingerprint"}, "efficiency": eff})
            lines.append(f"| {r['strategy']} | {r['processes']} | {r['per_process_batch']} | {r['images_per_s']:.2f} | "
                         f"{'' if eff is None else f'{eff:.3f}'} | {_gib(r.get('peak_gib'))} | {r['device']} |")
        by = {(r["processes"], r["strategy"]): r for r in sx if r.get("fingerprint")}
        for (n, s), r in by.items():
            if s == "fsdp" and (n, "ddp") in by:
                fd, fs = by[(n, "ddp")]["fingerprint"], r["fingerprint"]
                e = {"processes": n, "norms_rel": rel_vec(fs["norms"], fd["norms"]),
                     "projections_rel": rel_vec(fs["projections"], fd["projections"])}
                e["within_tolerance"] = e["norms_rel"] <= GRAD_TOL and e["projections_rel"] <= GRAD_TOL
                res["sdxl_full_fsdp_vs_ddp"] = e
                lines += ["", f"FSDP vs DDP on {n} GPUs, first gradient on the same global batch: per-tensor norms "
                              f"differ by {e['norms_rel']:.2e}, random projections by {e['projections_rel']:.2e} "
                              f"(relative L2; tolerance {GRAD_TOL:.1e}: {'yes' if e['within_tolerance'] else 'NO'})."]
    md = "\n".join(lines) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ddp_scaling.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    with open(os.path.join(out, "ddp_scaling.md"), "w") as fh:
        fh.write(md)
    return md


if __name__ == "__main__":
    print(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else sys.argv[1]))

#!/usr/bin/env python3
"""Where a captured training step's time goes on the GPU's timeline (issue 7, session 22).

A kernel table (``train_step.py --profile``) sums kernel times; a CUDA graph's step time is its timeline's span,
which also counts the idle time between dependent kernels (a graph launches a kernel only after its predecessors
finish) and not the time kernels of parallel branches (the op's side streams) overlap. At batch 1 the adapted
layers' kernels are short, so the span is what differs; this reads one replay's kernels and splits the span:

* **idle**: no kernel running — dependency latency, charged to the kernel that ends the gap (the one waited for);
* **exposed** time per kernel: each instant's length divided among the kernels running then (an instant with one
  kernel is all that kernel's: on the critical path or close to it).

``train_step.py --graph --graph-trace KEYS`` writes ``graph_trace_<model>_b<batch>_<algo>_<variant>.json`` (one
replay's kernels: name, start and duration in µs, stream) for the configurations named like ``--profile``'s;
this module summarises one trace or the difference of two:

    python benchmarks/graph_trace.py results/runNN/graph_trace_sdxl_b1_lora_lyco.json \\
        results/runNN/graph_trace_sdxl_b1_floor_floor.json

and ``--minus TRACE2 BASE2`` the difference of two such differences — an adapter's time over its floor on one
layout against the same on another (run 279's LoKr on the frozen conv layout and as given).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

#: (kind, pattern on the kernel name), first match wins
KINDS = [
    ("splitK-reduce", r"splitKreduce|reduce_kernel.*splitk|Splitk"),
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention|cudnn::fusion"),  # cuDNN SDPA's dq/do·o kernels
    ("conv", r"cudnn|implicit_gemm|conv|dgrad|wgrad|xmma_fprop|nchwToNhwc|nhwcToNchw"),
    ("triton", r"^triton|^_|fused_lowrank|_kernel$"),
    ("gemm", r"gemm|nvjet|cutlass|sm90_xmma|Kernel2|magma|cublas"),
    ("norm", r"norm|welford"),
    ("reduce", r"reduce|sum|mean"),
    ("copy", r"copy|cat|Memcpy|Memset|fill|CatArray"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise"),
]


def kind(name: str) -> str:
    for k, pat in KINDS:
        if re.search(pat, name, re.I):
            return k
    return "other"


def from_chrome(path: str | Path) -> list[dict]:
    """The device kernels (and memcpy/memset) of a torch.profiler chrome trace, as ``{n, t, d, s}`` (name, start µs
    relative to the first, duration µs, stream)."""
    p = Path(path)
    raw = gzip.open(p, "rt").read() if p.suffix == ".gz" else p.read_text()
    ev = json.loads(raw)
    ev = ev.get("traceEvents", ev) if isinstance(ev, dict) else ev
    ks = [e for e in ev if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not ks:
        return []
    t0 = min(float(e["ts"]) for e in ks)
    return [{"n": e["name"][:100], "t": round(float(e["ts"]) - t0, 3), "d": round(float(e["dur"]), 3),
             "s": (e.get("args") or {}).get("stream", e.get("tid"))} for e in sorted(ks, key=lambda e: e["ts"])]


def load(path: str | Path) -> list[dict]:
    """A trace written by ``train_step.py --graph-trace`` (``{"kernels": [...]}``; gzipped as committed: ``.json.gz``)."""
    p = Path(path)
    return json.loads(gzip.open(p, "rt").read() if p.suffix == ".gz" else p.read_text())["kernels"]


def summary(ks: list[dict]) -> dict:
    """Span, busy (union of kernel intervals), idle, summed kernel time, per-stream counts, and per kind: count,
    summed time, exposed time, idle charged (see the module doc). Times in µs."""
    if not ks:
        return {"span": 0.0, "busy": 0.0, "idle": 0.0, "sum": 0.0, "count": 0, "kinds": {}, "streams": {}}
    bounds = []
    for i, k in enumerate(ks):
        bounds.append((k["t"], 1, i))
        bounds.append((k["t"] + k["d"], 0, i))
    bounds.sort()  # at equal times ends (0) before starts (1)
    exposed = [0.0] * len(ks)
    idle_to = [0.0] * len(ks)
    active: set[int] = set()
    last = bounds[0][0]
    idle = 0.0
    gap_open = None
    for t, is_start, i in bounds:
        dt = t - last
        if dt > 0:
            if active:
                share = dt / len(active)
                for j in active:
                    exposed[j] += share
            else:
                idle += dt
        last = t
        if is_start:
            if not active and gap_open is not None:
                idle_to[i] += t - gap_open
                gap_open = None
            active.add(i)
        else:
            active.discard(i)
            if not active:
                gap_open = t
    span = max(k["t"] + k["d"] for k in ks) - min(k["t"] for k in ks)
    kinds: dict[str, dict] = defaultdict(lambda: {"count": 0, "sum": 0.0, "exposed": 0.0, "idle_before": 0.0})
    names: dict[str, dict] = defaultdict(lambda: {"count": 0, "sum": 0.0, "exposed": 0.0, "idle_before": 0.0})
    streams: dict[str, dict] = defaultdict(lambda: {"count": 0, "sum": 0.0})
    for i, k in enumerate(ks):
        for d in (kinds[kind(k["n"])], names[k["n"][:70]]):
            d["count"] += 1
            d["sum"] += k["d"]
            d["exposed"] += exposed[i]
            d["idle_before"] += idle_to[i]
        streams[str(k["s"])]["count"] += 1
        streams[str(k["s"])]["sum"] += k["d"]
    total = sum(k["d"] for k in ks)
    return {"span": span, "busy": span - idle, "idle": idle, "sum": total, "count": len(ks),
            "concurrency": total / (span - idle) if span > idle else 0.0,
            "kinds": dict(kinds), "names": dict(names), "streams": dict(streams)}


def gaps(ks: list[dict], width: int = 40) -> dict:
    """The idle gaps (no kernel running) grouped by the pair around each: the kernel that ended last before it and
    the one that starts it, names cut to ``width`` — ``{(before, after): [µs of each gap]}``. Which waits grew in one
    step against another (session 38: LoRA's step waits 9.6 µs from cuDNN attention's memset to its kernel where
    the floor waits 4.7)."""
    out: dict = defaultdict(list)
    end, before = None, None
    for k in sorted(ks, key=lambda k: k["t"]):
        if end is not None and k["t"] > end:
            out[(before["n"][:width], k["n"][:width])].append(k["t"] - end)
        if end is None or k["t"] + k["d"] >= end:
            end, before = k["t"] + k["d"], k
    return dict(out)


def fmt_gaps(g: dict, title: str = "", top: int = 12) -> str:
    """:func:`gaps` as text: the pairs by total idle, with their count and median gap."""
    out = [f"== {title}: idle gaps by the kernels around them (total ms, count, median µs)"]
    for (a, b), v in sorted(g.items(), key=lambda x: -sum(x[1]))[:top]:
        out.append(f"   {sum(v) / 1e3:7.3f} {len(v):5d}× {statistics.median(v):6.2f}  {a} → {b}")
    return "\n".join(out)


def fmt(s: dict, title: str = "", top: int = 12) -> str:
    """One summary as text (ms)."""
    out = [f"== {title}: span {s['span'] / 1e3:.2f} ms = busy {s['busy'] / 1e3:.2f} + idle {s['idle'] / 1e3:.2f}; "
           f"{s['count']} kernels summing to {s['sum'] / 1e3:.2f} ms (concurrency {s.get('concurrency', 0):.2f}); "
           f"streams " + ", ".join(f"{k}:{v['count']}" for k, v in sorted(s["streams"].items(), key=lambda x: -x[1]['count']))]
    out.append("   kind            count   sum ms  exposed  idle-before")
    for k, d in sorted(s["kinds"].items(), key=lambda x: -x[1]["exposed"] - x[1]["idle_before"]):
        out.append(f"   {k:<14} {d['count']:6d} {d['sum'] / 1e3:8.2f} {d['exposed'] / 1e3:8.2f} {d['idle_before'] / 1e3:8.2f}")
    out.append("   top kernels by exposed + idle-before (ms):")
    for n, d in sorted(s["names"].items(), key=lambda x: -x[1]["exposed"] - x[1]["idle_before"])[:top]:
        out.append(f"   {d['count']:6d}× sum {d['sum'] / 1e3:6.2f} exp {d['exposed'] / 1e3:6.2f} idle {d['idle_before'] / 1e3:5.2f}  {n}")
    return "\n".join(out)


def sub(a: dict, b: dict) -> dict:
    """``a`` minus ``b`` field by field, as a summary :func:`diff` takes — one side of a double difference: an adapter's
    step minus its floor on one layout against the same on another (session 39: LoKr's +0.80 ms of adapter time on the
    frozen conv layout was one kernel, cuDNN's ``wgrad2d_grouped_direct_kernel``, +0.75)."""
    z = {"count": 0, "sum": 0.0, "exposed": 0.0, "idle_before": 0.0}

    def table(key):
        return {k: {f: a[key].get(k, z)[f] - b[key].get(k, z)[f] for f in z} for k in set(a[key]) | set(b[key])}

    return {**{f: a[f] - b[f] for f in ("span", "busy", "idle", "sum", "count")}, "kinds": table("kinds"),
            "names": table("names")}


def diff(a: dict, b: dict, title: str = "", top: int = 15) -> str:
    """``a`` minus ``b`` (e.g. an adapter's step minus the floor's) by kind and by kernel name."""
    out = [f"== {title}: span {(a['span'] - b['span']) / 1e3:+.2f} ms = busy {(a['busy'] - b['busy']) / 1e3:+.2f} "
           f"+ idle {(a['idle'] - b['idle']) / 1e3:+.2f}; kernels {a['count'] - b['count']:+d}, "
           f"summed time {(a['sum'] - b['sum']) / 1e3:+.2f} ms"]
    out.append("   kind            Δcount   Δsum  Δexposed  Δidle-before")
    keys = set(a["kinds"]) | set(b["kinds"])
    z = {"count": 0, "sum": 0.0, "exposed": 0.0, "idle_before": 0.0}
    rows = [(k, a["kinds"].get(k, z), b["kinds"].get(k, z)) for k in keys]
    rows.sort(key=lambda r: -(r[1]["exposed"] + r[1]["idle_before"] - r[2]["exposed"] - r[2]["idle_before"]))
    for k, x, y in rows:
        out.append(f"   {k:<14} {x['count'] - y['count']:+7d} {(x['sum'] - y['sum']) / 1e3:+7.2f} "
                   f"{(x['exposed'] - y['exposed']) / 1e3:+8.2f} {(x['idle_before'] - y['idle_before']) / 1e3:+8.2f}")
    out.append("   kernel names by Δ(exposed + idle-before), ms:")
    keys = set(a["names"]) | set(b["names"])
    rows = [(n, a["names"].get(n, z), b["names"].get(n, z)) for n in keys]
    rows.sort(key=lambda r: -abs(r[1]["exposed"] + r[1]["idle_before"] - r[2]["exposed"] - r[2]["idle_before"]))
    for n, x, y in rows[:top]:
        out.append(f"   {x['count'] - y['count']:+6d}× Δexp {(x['exposed'] - y['exposed']) / 1e3:+6.2f} "
                   f"Δidle {(x['idle_before'] - y['idle_before']) / 1e3:+5.2f} Δsum {(x['sum'] - y['sum']) / 1e3:+6.2f}  {n}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="a graph_trace_*.json (or a chrome trace, .json[.gz])")
    p.add_argument("base", nargs="?", help="a second trace to subtract (e.g. the floor's)")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--gaps", action="store_true", help="also the idle gaps by the pair of kernels around them")
    p.add_argument("--minus", nargs=2, metavar=("TRACE2", "BASE2"),
                   help="with base: also (trace − base) − (TRACE2 − BASE2), e.g. an adapter's time over its floor on "
                        "one layout against the same on another")
    a = p.parse_args()
    if a.minus and not a.base:
        p.error("--minus needs the base trace")
    rd = lambda f: load(f) if Path(f).name.startswith("graph_trace_") else from_chrome(f)
    s = summary(rd(a.trace))
    name = lambda f: Path(f).name.split(".")[0]
    print(fmt(s, name(a.trace), a.top))
    if a.gaps:
        print(fmt_gaps(gaps(rd(a.trace)), name(a.trace), a.top))
    if a.base:
        b = summary(rd(a.base))
        print(fmt(b, name(a.base), a.top))
        if a.gaps:
            print(fmt_gaps(gaps(rd(a.base)), name(a.base), a.top))
        print(diff(s, b, f"{name(a.trace)} − {name(a.base)}", a.top + 3))
        if a.minus:
            c, d = (summary(rd(f)) for f in a.minus)
            lab = lambda f: f"{Path(f).parent.name}/{name(f)}"  # noqa: E731 — pairs from two runs share names
            print(diff(sub(s, b), sub(c, d), f"({lab(a.trace)} − {lab(a.base)}) − ({lab(a.minus[0])} − "
                                             f"{lab(a.minus[1])})", a.top + 3))


if __name__ == "__main__":
    main()

"""What is allocated at a training step's peak, by the code that allocated it (issue 7, session 24).

``train_step.py --graph --memory-peak KEYS`` records torch's allocator history
(``torch.cuda.memory._record_memory_history``, Python stacks) over a configuration's graph phase — the warm-up and
the capture (since run 179; runs 177–178 included the eager step that checks for host synchronisations) — and hands the snapshot to :func:`peak`, which
replays its allocation events in order, finds the moment the allocated total was highest, and groups the blocks
live then by their allocation site: the innermost stack frame in the benchmark's, lyco's or a peer's code (torch's
own frames skipped; a C++ autograd node's allocations carry the frames of the code that called ``backward``), or
``(no Python frame)``. The totals are relative to the allocation when the recording started, and a free of a block
allocated before it is not seen (run 177: lyco's FlatAdamW moves the parameters into one flat buffer, which shows
as +81 MiB at SDXL b4 where the parameters' own blocks, freed, were never counted). Blocks of exactly 32 MiB are
counted apart: cuBLAS's workspaces on Hopper are (attributed to
the GEMM's caller), and an activation may be. Two such summaries (lyco's and PEFT's) show where their peaks differ.

    python benchmarks/memory_peak.py results/runNN/memory_peak_sdxl_b4_lora_lyco.json [other.json]
"""

from __future__ import annotations

import argparse
import json

MIB = 2**20
#: a frame in one of these counts as the allocation's site (the innermost one); torch's own frames do not
SITES = ("/lyco/", "/peft/", "/lycoris/", "/diffusers/", "train_step.py")
WORKSPACE = 32 * MIB


def _site(frames) -> str:
    for f in frames or ():
        name = f.get("filename", "")
        if any(s in name for s in SITES):
            tail = name.split("/site-packages/")[-1].split("/src/")[-1]
            return f"{tail}:{f.get('line')} {f.get('name')}"
    return "(no Python frame)"


def peak(snapshot: dict, device: int = 0, top: int = 25) -> dict:
    """The allocated total's peak over ``snapshot``'s trace of ``device`` (allocations minus completed frees,
    from the trace's start) and the blocks live then, grouped by site: ``{"peak_mib", "at_event", "events",
    "workspaces": (count, MiB), "sites": [[site, MiB, count], …]}`` (largest first, ``top`` of them)."""
    trace = snapshot["device_traces"][device]
    live: dict[int, tuple[int, str]] = {}
    total = best = 0
    best_i = -1
    for i, e in enumerate(trace):
        act = e.get("action")
        if act == "alloc":
            live[e["addr"]] = (e["size"], None)
            total += e["size"]
            if total > best:
                best, best_i = total, i
        elif act == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
    # the live set at the peak: replay up to it again, keeping each block's site
    live2: dict[int, tuple[int, str]] = {}
    for e in trace[:best_i + 1]:
        act = e.get("action")
        if act == "alloc":
            live2[e["addr"]] = (e["size"], _site(e.get("frames")))
        elif act == "free_completed":
            live2.pop(e["addr"], None)
    by: dict[str, list] = {}
    ws = [0, 0]
    for size, site in live2.values():
        b = by.setdefault(site, [0, 0])
        b[0] += size
        b[1] += 1
        if size == WORKSPACE:
            ws[0] += 1
            ws[1] += size
    sites = sorted(([k, v[0] / MIB, v[1]] for k, v in by.items()), key=lambda r: -r[1])[:top]
    return {"peak_mib": best / MIB, "at_event": best_i, "events": len(trace),
            "workspaces": [ws[0], ws[1] / MIB], "sites": [[k, round(m, 2), n] for k, m, n in sites]}


def record_start(max_entries: int = 400_000) -> None:
    import torch
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")


def record_stop(path, device: int = 0) -> dict:
    """Stop recording; write :func:`peak`'s summary of what was recorded to ``path`` and return it."""
    import torch
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    out = peak(snap, device)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("summary", nargs="+", help="memory_peak_*.json (one or two)")
    args = ap.parse_args()
    runs = [json.load(open(p)) for p in args.summary]
    for p, r in zip(args.summary, runs):
        print(f"== {p}: peak {r['peak_mib']:.1f} MiB at event {r['at_event']} of {r['events']}; "
              f"blocks of exactly 32 MiB (cuBLAS workspaces among them) {r['workspaces'][0]}")
        for site, mib, n in r["sites"]:
            print(f"   {mib:10.2f} MiB {n:6d}  {site}")
    if len(runs) == 2:
        a, b = ({s: m for s, m, _ in r["sites"]} for r in runs)
        print(f"== difference (first − second): {runs[0]['peak_mib'] - runs[1]['peak_mib']:+.1f} MiB")
        for s in sorted(set(a) | set(b), key=lambda s: -abs(a.get(s, 0) - b.get(s, 0)))[:20]:
            print(f"   {a.get(s, 0) - b.get(s, 0):+10.2f} MiB  {s}")


if __name__ == "__main__":
    main()

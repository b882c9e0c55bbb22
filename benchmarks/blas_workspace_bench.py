"""cuBLAS's workspace on lyco's side streams (issue 7, session 24): how much memory each (thread, stream) pair's
workspace takes at torch's size and under ``lowrank._side_blas``, and what the size does to the adapter's thin
products at SD1.5's and SDXL's shapes.

torch keeps one cuBLAS workspace per (thread's handle, stream) for the process's life, at the size set when the pair
is first used (32 MiB on Hopper). A captured lyco step uses its two side streams, so each costs that much of the
step's peak (per issuing thread). ``lowrank._side_blas`` sets torch's workspace size around the side regions
(``torch._C._cuda_setCublasWorkspaceSize``: torch 2.13's CUDA builds; not torch 2.11, run 173). This script:

1. prints whether this torch has the API, the memory a fresh stream's first GEMM allocates at torch's size and under
   ``_side_blas`` (``LYCO_SIDE_BLAS_WORKSPACE``), and that a GEMM on a small-workspace stream outside the block is
   still right (torch allocates a larger workspace then);
2. times each thin product (the forward's down ``x·Dᵀ``, the backward's ``∂y·U``, ``∂yᵀ·h`` and ``∂hᵀ·x``) at the
   models' shapes on a stream of its own, as one CUDA graph of 50 calls per (shape, size) (run 175 timed the mean of
   20 replays on one side stream; ``_common.graph_us``'s median of 7 since), for workspace sizes in MiB
   (``--sizes``; 32 is torch's own), and the sum over a model's layers (``--models``: the per-level layer counts
   below, attention and feed-forward linear layers, rank 16).

    python benchmarks/blas_workspace_bench.py --out DIR [--sizes 32,8,4,1,0] [--models sdxl:1,sdxl:4,sd15:1,sd15:8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from _common import graph_us  # noqa: E402

from lyco.algorithms import lowrank  # noqa: E402

MIB = 2**20
R = 16
#: (rows, in, out, count) of a step's adapted linear layers per level at batch 1 — per transformer block six square
#: layers (self-attention's q, k, v, out; cross-attention's q and out: its k and v read the 77 text rows, left
#: out), the feed-forward's GEGLU projection (C → 8C) and output (4C → C). SDXL at 1024 px: 10 blocks at 64×64
#: (640 channels), 60 at 32×32 (1280); SD1.5 at 512 px: 5 blocks each at 64×64, 32×32, 16×16, one at 8×8
SHAPES = {
    "sdxl": [(4096, 640, 640, 60), (4096, 640, 5120, 10), (4096, 2560, 640, 10),
             (1024, 1280, 1280, 360), (1024, 1280, 10240, 60), (1024, 5120, 1280, 60)],
    "sd15": [(4096, 320, 320, 30), (4096, 320, 2560, 5), (4096, 1280, 320, 5),
             (1024, 640, 640, 30), (1024, 640, 5120, 5), (1024, 2560, 640, 5),
             (256, 1280, 1280, 30), (256, 1280, 10240, 5), (256, 5120, 1280, 5),
             (64, 1280, 1280, 6), (64, 1280, 10240, 1), (64, 5120, 1280, 1)],
}


def products(rows, din, dout, dev):
    """The four thin products of one layer as (name, thunk) over bf16 operands."""
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=g)  # noqa: E731
    x, gy, d, u, h, gh = mk(rows, din), mk(rows, dout), mk(R, din), mk(dout, R), mk(rows, R), mk(rows, R)
    return [("down x·Dᵀ", lambda: x @ d.t()), ("∂h ∂y·U", lambda: gy @ u),
            ("∂U ∂yᵀ·h", lambda: gy.t() @ h), ("∂D ∂hᵀ·x", lambda: gh.t() @ x)]


def side_us(fn) -> float:
    """µs per call of ``fn`` as one CUDA graph of 50 calls (``_common.graph_us``: on a stream of its own) under
    ``_side_blas`` — what lyco's side regions set there."""
    def scoped():
        with lowrank._side_blas(torch.cuda.current_stream()):
            fn()
    return graph_us(scoped, 50)


def memory_check(dev):
    out = {"torch": torch.__version__, "api": [f is not None for f in lowrank._WS_API],
           "torch_size_mib": lowrank._WS_API[0]() / MIB if lowrank._WS_API[0] else None}
    a, b = torch.randn(4096, 1280, device=dev, dtype=torch.bfloat16), torch.randn(4096, 16, device=dev,
                                                                                  dtype=torch.bfloat16)
    ref = (a.double().t() @ b.double())
    for label, scoped in (("torch's size", False), ("_side_blas", True)):
        s = torch.cuda.Stream()
        torch.cuda.synchronize()
        m0 = torch.cuda.memory_allocated()
        with torch.cuda.stream(s):
            if scoped:
                with lowrank._side_blas(s):
                    c = a.t() @ b
            else:
                c = a.t() @ b
        torch.cuda.synchronize()
        m1 = torch.cuda.memory_allocated()
        out[label] = {"workspace_mib": (m1 - m0 - c.numel() * c.element_size()) / MIB,
                      "err": float((c.double() - ref).abs().max() / ref.abs().max())}
        if scoped:  # the same stream outside the block: torch's size again — a larger workspace, the product right
            with torch.cuda.stream(s):
                c2 = a.t() @ b
            torch.cuda.synchronize()
            out["after, outside"] = {"workspace_mib": (torch.cuda.memory_allocated() - m1
                                                       - c2.numel() * c2.element_size()) / MIB,
                                     "err": float((c2.double() - ref).abs().max() / ref.abs().max())}
        del c
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--sizes", default="32,8,4,1,0", help="workspace sizes in MiB (32: torch's own on Hopper)")
    ap.add_argument("--models", default="sdxl:1,sdxl:4,sd15:1,sd15:8", help="model:batch (rows scale with batch)")
    args = ap.parse_args()
    for key in args.models.split(","):
        if key.count(":") != 1 or key.split(":")[0] not in SHAPES or not key.split(":")[1].isdigit():
            ap.error(f"--models: {key!r} is not model:batch with model one of {', '.join(SHAPES)}")
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "memory": memory_check(dev), "times": []}
    print(json.dumps(res["memory"], indent=1))
    if None in lowrank._WS_API:
        # this torch cannot set the size (torch 2.11: run 173): time at the process's own size instead — torch's
        # default, or CUBLAS_WORKSPACE_CONFIG's (process-wide; the run script starts one process per size)
        cfg = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        mib = (sum(int(a) * int(b) for a, b in re.findall(r":(\d+):(\d+)", cfg)) / 1024) if cfg else 32.0
        print(f"this torch cannot set cuBLAS's workspace size: timings at the process's own, {mib:g} MiB")
        sizes, setting = [mib], False
    else:
        sizes, setting = [float(v) for v in args.sizes.split(",")], True
    for key in args.models.split(","):
        model, batch = key.split(":")
        model, batch = f"{model}_b{batch}", int(batch)
        tot = {sz: {} for sz in sizes}
        for rows, din, dout, count in SHAPES[key.split(":")[0]]:
            rows *= batch
            for name, fn in products(rows, din, dout, dev):
                row = {"model": model, "rows": rows, "in": din, "out": dout, "count": count, "product": name}
                for sz in sizes:
                    if setting:
                        os.environ["LYCO_SIDE_BLAS_WORKSPACE"] = f"{sz:g}"
                    us = side_us(fn)
                    row[f"{sz:g}"] = round(us, 2)
                    tot[sz][name] = tot[sz].get(name, 0.0) + us * count
                res["times"].append(row)
                print(model, rows, din, dout, name, " ".join(f"{k}={row[f'{k:g}']}" for k in sizes), flush=True)
        for sz in sizes:
            print(f"{model} ws {sz:g} MiB: summed over the step's layers (ms) "
                  + ", ".join(f"{k} {v / 1000:.3f}" for k, v in tot[sz].items())
                  + f"; all {sum(tot[sz].values()) / 1000:.3f}")
        res[f"{model}_sum_ms"] = {f"{sz:g}": {k: v / 1000 for k, v in tot[sz].items()} for sz in sizes}
    tag = "" if setting else f"_{sizes[0]:g}mib"
    with open(os.path.join(args.out, f"blas_workspace{tag}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

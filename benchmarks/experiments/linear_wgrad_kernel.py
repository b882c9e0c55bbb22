#!/usr/bin/env python3
"""A linear layer's thin weight gradients by the conv weight-gradient kernel (issue 7, session 44, run 311).

Run 300's and 309's SDXL b1 timelines have cuBLAS's split-K ``splitKreduce_kernel`` +480 launches in LoRA's step
over the floor (2.65 ms exposed) and +944 more in LoKr's than in LoRA's (3.59 ms exposed): the second launch of a
thin product ``Aᵀ·B`` whose K is the rows (``∂U = s·∂yᵀh``, ``∂D = s·∂hᵀx``). ``lyco.algorithms.wgrad_triton``'s
kernel (session 40) sums its split-K partials in the launch itself (the last program of a tile), so on a linear
layer's operands viewed as a 1×1 conv of one image — ``x (rows, c)`` as ``(1, c, rows, 1)``, ``∂h (rows, r)`` as
``(1, r, rows, 1)`` — it is one launch where cuBLAS takes two. Earlier Triton thin products lost to cuBLAS in
isolation (run 74: 6.52 against 5.51 ms summed over SD1.5's shapes, their partials summed by a second launch).

Per SDXL b1 shape (rows, c, r): cuBLAS ``torch.mm(a.t(), b)`` with the side regions' SM target (``blas_sms.side``,
32 SMs in a capture) and without, the kernel in its ``taps`` and ``cols`` forms; µs per call, 20 calls captured in
one graph, median of 7 replays, after a check against float64.

    python benchmarks/experiments/linear_wgrad_kernel.py [--out FILE] [--shapes lokr]
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _common import graph_us  # noqa: E402

from lyco.algorithms import blas_sms, wgrad_triton  # noqa: E402

# (rows, c, r): c the wide operand's columns (∂U: out; ∂D: in). SDXL b1 at 1024 px: 4096 rows at 640 channels,
# 1024 at 1280; the attention and proj layers' c = channels, the GEGLU's projection out 8·channels, ff.net.2 in 4·.
SHAPES = [(rows, c, r) for rows, ch in ((4096, 640), (1024, 1280))
          for c in (ch, 4 * ch, 8 * ch) for r in (16, 64)]
#: ``--shapes lokr`` (session 45, run 317's makers): LoKr's ∂B on a linear layer at SDXL b1 — its in_m = 8 groups
#: folded into the rows (rows·8, in/8, r 16); per step 424× (8192, 160) (the 1280-channel level's 1280-input
#: layers), 65× (32768, 80), 60× (8192, 640), 10× (32768, 320). cuBLAS splits each in K and adds a splitKreduce.
LOKR_SHAPES = [(8192, 160, 16), (32768, 80, 16), (8192, 640, 16), (32768, 320, 16)]


def _views(a, b):
    """a (rows, c), b (rows, r) as the kernel's x (1, c, rows, 1) and ∂h (1, r, rows, 1)."""
    return a.t().unsqueeze(0).unsqueeze(-1), b.t().unsqueeze(0).unsqueeze(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--shapes", choices=("lora", "lokr"), default="lora")
    args = ap.parse_args()
    shapes = LOKR_SHAPES if args.shapes == "lokr" else SHAPES
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev), "SMs", blas_sms.device_sms(), "side SMs", blas_sms.side_sms(), flush=True)
    rows_out = []
    tot = {}
    for rows, c, r in shapes:
        g = torch.Generator(device=dev).manual_seed(rows + c + r)
        a = torch.randn(rows, c, device=dev, dtype=torch.bfloat16, generator=g)
        b = torch.randn(rows, r, device=dev, dtype=torch.bfloat16, generator=g)
        ref = (b.double().t() @ a.double())  # (r, c): the kernel's ∂D layout; cuBLAS's ∂U is its transpose
        xv, gv = _views(a, b)

        def side():
            with blas_sms.side(True):
                return torch.mm(a.t(), b)
        fns = {
            "cublas": lambda: torch.mm(a.t(), b),
            "cublas_side": side,
            "taps": lambda: wgrad_triton.conv_wgrad(xv, gv, 1, form="taps"),
            "cols": lambda: wgrad_triton.conv_wgrad(xv, gv, 1, form="cols"),
        }
        if args.shapes == "lokr":  # the groups as 8 images of rows/8 positions (the conv rule's batch form)
            xg = a.view(rows // 8, 8, c).permute(1, 2, 0).unsqueeze(-1)
            gg = b.view(rows // 8, 8, r).permute(1, 2, 0).unsqueeze(-1)
            fns["taps_g8"] = lambda: wgrad_triton.conv_wgrad(xg, gg, 1, form="taps")
        rec = {"rows": rows, "c": c, "r": r}
        for name, fn in fns.items():
            out = fn()
            got = (out.t() if name.startswith("cublas") else out.view(r, c)).double()
            err = ((got - ref).norm() / ref.norm()).item()
            us = graph_us(fn, 20)
            rec[name] = round(us, 2)
            rec[name + "_err"] = float(f"{err:.2e}")
            tot[name] = tot.get(name, 0.0) + us
        rows_out.append(rec)
        print(json.dumps(rec), flush=True)
    print("total µs", {k: round(v, 1) for k, v in tot.items()}, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "shapes": rows_out, "total_us": tot}, f, indent=1)


if __name__ == "__main__":
    main()

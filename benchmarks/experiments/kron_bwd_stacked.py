#!/usr/bin/env python3
"""LoKr's stacked factor-batch backward, ∂U read once against twice (issue 7, session 45).

Run 317's SDXL b1 LoKr timeline has one ``_kron_bwd_kernel`` launch at 556 µs, fully exposed: by inference the batch
of the 1280-output layers (U = kron(W1 8×8, A 160×16): 1280 × 128 per member). That launch's ∂W1 programs (one per
entry of W1) re-read their member's ∂U columns and all of A. ``factor_triton.kron_backward_batched`` now reads ∂U
once (``_kron_bwd_stacked_kernel``); this times both at SDXL b1's groups (µs a call, 5 calls in one graph, median of 7
replays) after checking both against fp32 torch, and, run as ``--train`` with train_step.py's arguments, runs
``benchmarks/train_step.py`` with the old launch in its place (the A/B's off leg). Also times other one-read
geometries (``factor_triton._STACKED``; run 321 timed the one-read launch at 8192-element tiles, run 322 also
that launch up to 256 rows of A only and four other geometries).

    PYTHONPATH=src python benchmarks/experiments/kron_bwd_stacked.py [--out FILE]
    PYTHONPATH=src python benchmarks/experiments/kron_bwd_stacked.py --train …train_step.py args…
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lyco.algorithms import factor_triton as F  # noqa: E402

#: (members, out_l, in_m, out_k, r): SDXL b1 LoKr f8 r16's groups by output size, members by inference from the
#: layer counts (1280: ≈ 560; 10240: 60; 640: ≈ 90; 5120: 10)
SHAPES = [(560, 8, 8, 160, 16), (60, 8, 8, 1280, 16), (90, 8, 8, 80, 16), (10, 8, 8, 640, 16)]


def old_backward_batched(w1, a, gu):
    """The launch before session 45 at every size (∂A's and ∂W1's programs each reading ∂U)."""
    return F._kron_backward_batched_two_reads(w1, a, gu)


def inputs(shape, dev):
    """bf16 ``W1 (n, ol, im)``, ``A (n, ok, r)`` and ``∂U (n, ol·ok, im·r)``, seeded by the shape."""
    n, ol, im, ok, r = shape
    g = torch.Generator(device=dev).manual_seed(n + ok)
    return (torch.randn(n, ol, im, device=dev, generator=g).bfloat16(),
            torch.randn(n, ok, r, device=dev, generator=g).bfloat16(),
            torch.randn(n, ol * ok, im * r, device=dev, generator=g).bfloat16())


def reference(w1, a, gu):
    """``(∂W1, ∂A)`` in float64 from their definitions (module doc of ``factor_triton``)."""
    n, ol, im = w1.shape
    _, ok, r = a.shape
    g5 = gu.double().view(n, ol, ok, im, r)
    return ((g5 * a.double()[:, None, :, None, :]).sum((2, 4)), (g5 * w1.double()[:, :, None, :, None]).sum((1, 3)))


def time_form(fn, w1, a, gu, want, rec: dict, name: str) -> None:
    """``rec[name_err]``: ``fn``'s worst relative error against ``want`` (fp32 ``(∂W1, ∂A)``); ``rec[name_us]``: µs a
    call, 5 calls in one graph, median of 7 replays."""
    from _common import graph_us
    got = fn(w1, a, gu)
    rec[name + "_err"] = max(float(f"{((x.float() - y).abs().max() / y.abs().max()).item():.2e}")
                             for x, y in zip(got, want))
    rec[name + "_us"] = round(graph_us(lambda: fn(w1, a, gu), 5), 1)


#: one-read launch geometries timed besides the default (tile elements, warps, programs per multiprocessor)
GEOMS = [(8192, 8, 4), (16384, 8, 16), (32768, 8, 4), (16384, 4, 4)]


def bench(out_path=None) -> None:
    from _common import graph_us, write_records
    dev = torch.device("cuda")
    recs = []
    for shape in SHAPES:
        w1, a, gu = inputs(shape, dev)
        want = [t.float() for t in reference(w1, a, gu)]
        rec = dict(zip(("n", "ol", "im", "ok", "r"), shape), gu_mb=round(gu.numel() * 2 / 1e6, 1))
        for name, fn in (("old", old_backward_batched), ("stacked", F.kron_backward_batched)):
            time_form(fn, w1, a, gu, want, rec, name)
        rec["stacked_tb_s"] = round(gu.numel() * 2 / rec["stacked_us"] / 1e6, 2)
        keep = dict(F._STACKED)
        for tile, warps, per_sm in GEOMS:
            F._STACKED.update(tile=tile, num_warps=warps, per_sm=per_sm)
            try:
                us = graph_us(lambda: F.kron_backward_batched(w1, a, gu), 5)
                rec[f"t{tile}_w{warps}_p{per_sm}_us"] = round(us, 1)
            except Exception as e:  # noqa: BLE001 — a geometry Triton cannot compile: recorded, the rest timed
                rec[f"t{tile}_w{warps}_p{per_sm}_us"] = f"failed: {type(e).__name__}"
            finally:
                F._STACKED.clear()
                F._STACKED.update(keep)
        recs.append(rec)
        print(json.dumps(rec), flush=True)
    write_records(out_path, recs, dev)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--train":
        import train_step
        F.kron_backward_batched = old_backward_batched
        sys.argv = [sys.argv[0]] + sys.argv[2:]
        train_step.main()
    else:
        import argparse
        ap = argparse.ArgumentParser(description="LoKr's stacked factor backward: the one-read launch against the "
                                     "two-read one at SDXL b1's groups (--train …: train_step.py with the old one)")
        ap.add_argument("--out", help="write the records as JSON here")
        bench(ap.parse_args().out)

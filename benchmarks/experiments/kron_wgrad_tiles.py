#!/usr/bin/env python3
"""LoKr's two reductions of the rebuilt op's weight gradient ``∂W′`` — ``factor_triton.kron_weight_grads`` — alone,
per layer shape: the library's launch at four tile sizes, and a form that loads each program's ``(BK, M, BC)`` block
at once (issue 7: prepared in session 47, run 334; the block kernel the library's default since session 48).

Run 328's SDXL b1 ``lokr-full`` timeline (H200) had ``_kron_wgrad_kernel`` at 8.6 µs and its finish at 6.1 µs a layer
on average (735 each), where reading a 1280 × 1280 bf16 ∂W′ takes ≈ 1 µs at the card's bandwidth. By the library
kernel's geometry (a program per (k, c) tile of 2048 elements and row i of W1, a serial loop over W1's M columns with
two full-tile reductions each) a 1280 × 1280 layer at factor 8 is 160 programs of 8 dependent steps. The block form
(``factor_triton._kron_wgrad_block_kernel``) loads the ``M`` slices together and reduces each over its own axes;
smaller tiles give more programs. Both write the library's partials, summed by the library's finish launch. The
one-pass form (``factor_triton._kron_wgrad_onepass``, session 48, off in the library by default) writes no partials
and has no finish: ∂W2's programs loop over W1's rows, one program per entry of ∂W1 reads its (k, c) slab.

For each shape of SD1.5's and SDXL's linear layers at factor 8 (``kron_direct_shapes.LAYERS``), µs a call (10 calls in
one CUDA graph, median of 7 replays) of each configuration, after checking it against float64; then per model the µs
summed over its layers (SDXL b1's counts) for each configuration, and the best per shape.

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/experiments/kron_wgrad_tiles.py --check
    PYTHONPATH=src python benchmarks/experiments/kron_wgrad_tiles.py [--out FILE]
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from lyco.algorithms import factor_triton as F  # noqa: E402
from lyco.algorithms.factorize import factorization  # noqa: E402


#: the library kernel's tile sizes (elements of a (k, c) tile) and the block form's (tile, warps)
LOOP_TILES = (512, 1024, 2048, 4096)
BLOCK_CFGS = ((256, 4), (512, 4), (512, 8), (1024, 8), (2048, 8), (2048, 4), (2048, 16), (4096, 8), (4096, 16),
              (8192, 16))
#: the one-pass form's (∂W2 tile, ∂W1 tile, warps): (k, c) elements a program (factor_triton._kron_wgrad_onepass)
ONEPASS_CFGS = ((256, 4096, 4), (512, 4096, 4), (512, 4096, 8), (1024, 4096, 8), (512, 2048, 4), (512, 8192, 8))


def kron_weight_grads_block(e, w1, w2, s=1.0, dtypes=(torch.float32, torch.float32), tile=1024, warps=8):
    """:func:`factor_triton.kron_weight_grads` with :func:`_kron_wgrad_block_kernel` (``tile`` elements of (k, c) a
    program, ``warps``) and the library's finish launch."""
    return F._kron_wgrad_launch(F._kron_wgrad_block_kernel, e, w1, w2, s, dtypes, tile, MP=F._p2(e.shape[2]),
                                num_warps=warps)


def kron_weight_grads_onepass(e, w1, w2, s=1.0, dtypes=(torch.float32, torch.float32), tile2=512, tile1=4096,
                              warps=4):
    """The library's one-pass form (one launch, no partials) at the given tiles and warps, whatever K·C."""
    return F._kron_wgrad_onepass(e, w1, w2, s, dtypes, tile2, tile1, warps)


def kron_weight_grads_loop(e, w1, w2, s=1.0, dtypes=(torch.float32, torch.float32), tile=2048):
    """The library's launch at ``tile`` elements a program (its ``_WGRAD_TILE`` by default)."""
    return F._kron_wgrad_launch(F._kron_wgrad_kernel, e, w1, w2, s, dtypes, tile)


def reference(e, w1, w2, s):
    """Both sums in float64."""
    e64, a, b = e.double(), w1.double(), w2.double()
    return s * torch.einsum("ikjc,kc->ij", e64, b), s * torch.einsum("ikjc,ij->kc", e64, a)


def _shape(inp, out, f=8):
    L, K = factorization(out, f)
    M, C = factorization(inp, f)
    return L, K, M, C


def _inputs(shape, dev, g, dtype):
    L, K, M, C = shape
    e = torch.randn(L, K, M, C, generator=g, device=dev).to(dtype)
    return e, torch.randn(L, M, generator=g, device=dev), torch.randn(K, C, generator=g, device=dev)


def _err(got, want):
    return max(float((u.double() - v).abs().max() / v.abs().max()) for u, v in zip(got, want))


def check() -> None:
    """CPU, Triton's interpreter: the block form at several tiles against float64, ragged shapes included."""
    g = torch.Generator().manual_seed(7)
    worst = 0.0
    for shape in ((2, 5, 3, 7), (4, 40, 4, 40), (8, 20, 8, 20), (3, 9, 6, 33)):
        e, w1, w2 = _inputs(shape, torch.device("cpu"), g, torch.float32)
        want = reference(e, w1, w2, 0.7)
        for tile, warps in ((64, 4), (256, 4), (1024, 8)):
            got = kron_weight_grads_block(e, w1, w2, 0.7, tile=tile, warps=warps)
            err = _err(got, want)
            worst = max(worst, err)
            assert err < 1e-5, (shape, tile, err)
        for tile2, tile1 in ((64, 256), (512, 4096)):
            err = _err(kron_weight_grads_onepass(e, w1, w2, 0.7, tile2=tile2, tile1=tile1), want)
            worst = max(worst, err)
            assert err < 1e-5, (shape, tile2, tile1, err)
    print(f"check ok: worst relative error {worst:.2e}")


def bench(out_path=None) -> None:
    from _common import graph_us, write_records
    from kron_direct_shapes import LAYERS
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    cfgs = {f"loop{t}": (lambda e, a, b, t=t: kron_weight_grads_loop(e, a, b, 0.5, tile=t)) for t in LOOP_TILES}
    cfgs.update({f"block{t}w{w}": (lambda e, a, b, t=t, w=w: kron_weight_grads_block(e, a, b, 0.5, tile=t, warps=w))
                 for t, w in BLOCK_CFGS})
    cfgs.update({f"one{t2}t{t1}w{w}": (lambda e, a, b, t2=t2, t1=t1, w=w:
                                       kron_weight_grads_onepass(e, a, b, 0.5, tile2=t2, tile1=t1, warps=w))
                 for t2, t1, w in ONEPASS_CFGS})
    recs = []
    for model, layers in LAYERS.items():
        counts = {}
        for _, inp, out, n in layers:
            counts[(inp, out)] = counts.get((inp, out), 0) + n
        tot = {name: 0.0 for name in cfgs}
        best = 0.0
        for (inp, out), n in counts.items():
            shape = _shape(inp, out)
            e, w1, w2 = _inputs(shape, dev, g, torch.bfloat16)
            want = reference(e, w1, w2, 0.5)
            rec = dict(model=model, inp=inp, out=out, layers=n, shape=shape)
            for name, fn in cfgs.items():
                try:
                    rec[name + "_err"] = round(_err(fn(e, w1, w2), want), 6)
                    rec[name + "_us"] = round(graph_us(lambda fn=fn: fn(e, w1, w2), 10), 2)
                    tot[name] += rec[name + "_us"] * n
                except Exception as ex:  # noqa: BLE001 — a configuration Triton cannot compile: recorded
                    rec[name + "_us"] = f"failed: {type(ex).__name__}: {str(ex)[:80]}"
                    tot[name] = float("nan")
            best += n * min(v for k, v in rec.items() if k.endswith("_us") and isinstance(v, float))
            recs.append(rec)
            print(json.dumps(rec), flush=True)
        summary = dict(model=model, summed_ms={k: round(v / 1e3, 3) for k, v in tot.items()},
                       summed_ms_best=round(best / 1e3, 3))
        recs.append(summary)
        print(json.dumps(summary), flush=True)
    write_records(out_path, recs, dev)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    check() if a.check else bench(a.out or None)

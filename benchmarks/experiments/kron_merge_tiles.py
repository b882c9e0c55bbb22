#!/usr/bin/env python3
"""LoKr's merged weight ``W′ = W + s·kron(W1, W2)`` — ``factor_triton.kron_merge``, built twice a step by the rebuilt
op (its forward and the backward's rebuild) — alone, per layer shape: the flat form (a program per run of W's flat
index, the row and column indices divided out of it per element) at three block sizes, and the tiled form
(``factor_triton._kron_merge_tile_kernel``: a program per ``(rows, cols)`` tile of W's matrix, the indices divided
once per row and per column) at several tiles and warps (issue 7, session 49).

Run 340's SDXL b1 ``lokr-full`` timeline (H200): ``_kron_merge_kernel`` 1495× summing to 13.15 ms, 9.14 of them
exposed — the largest exposed item over the floor. By the layer shapes below, reading W and writing W′ in bf16 twice a
step is ≈ 17.7 GB, ≈ 3.7 ms at the card's 4.8 TB/s — so the flat form's per-element index arithmetic (four integer
divisions by run-time sizes) was the suspect. Run 341 said no: the flat form summed to 3.44 ms a merge of every layer
(2.0 TB/s at 1280 × 1280, 3.3 µs a call; 3.4–3.9 TB/s on the larger layers), every tiled configuration to more
(3.84–6.53); in the step the merges' time beyond that is their overlap with the side region's kernels.

For each shape of SD1.5's and SDXL's linear layers at factor 8 (``kron_direct_shapes.LAYERS``; W bf16, the factors
fp32 as the trainer keeps them), µs a call (10 calls in one CUDA graph, median of 7 replays) of each configuration and
its bandwidth (W read and W′ written), after checking it against float64; then per model the µs summed over its layers
(each layer's count, one merge) for each configuration, and the best per shape.

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/experiments/kron_merge_tiles.py --check
    PYTHONPATH=src python benchmarks/experiments/kron_merge_tiles.py [--out FILE]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import triton  # noqa: E402 - the test extra (Linux x86-64) and the GPU machine have it
import triton.language as tl  # noqa: E402

from lyco.algorithms import factor_triton as F  # noqa: E402
from lyco.algorithms.factorize import factorization  # noqa: E402

#: the flat form's elements a program; the tiled form's (elements, columns at most, warps)
FLAT_BLOCKS = (1024, 2048, 4096)
TILE_CFGS = ((2048, 256, 4), (4096, 256, 4), (4096, 256, 8), (8192, 256, 8), (4096, 512, 4), (8192, 512, 8),
             (2048, 128, 4), (4096, 128, 4))


@triton.jit
def _kron_merge_tile_kernel(W, W1, W2, OUT, R, CO, K, C, s, sw1i, sw1j, sw2k, sw2c,
                            BR: tl.constexpr, BCOL: tl.constexpr):
    """``factor_triton._kron_merge_kernel`` over a ``(BR, BCOL)`` tile of W's ``(L·K, M·C)`` matrix: the row ``(i, k)``
    and column ``(j, c)`` indices divided once per row and column, not per element."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    t = tl.program_id(1) * BCOL + tl.arange(0, BCOL)
    i = r // K
    k = r - i * K
    j = t // C
    c = t - j * C
    mask = (r[:, None] < R) & (t[None, :] < CO)
    off = r[:, None] * CO + t[None, :]
    w = tl.load(W + off, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(W1 + i[:, None] * sw1i + j[None, :] * sw1j, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(W2 + k[:, None] * sw2k + c[None, :] * sw2c, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + off, (w + s * (a * b)).to(OUT.dtype.element_ty), mask=mask)


def _kron_merge_tiled(w, w1, w2, s, out, elements, cols, num_warps):
    """``factor_triton.kron_merge`` by :func:`_kron_merge_tile_kernel`: tiles of ``elements`` (a power of two, at least
    ``cols``) of W's ``(L·K, M·C)`` matrix, ``cols`` columns at most (fewer where M·C is narrower), into ``out``."""
    L, K, M, C = w.shape
    rows, co = L * K, M * C
    bcol = min(cols, F._p2(co))
    br = max(1, min(F._p2(rows), 1 << max(0, (elements // bcol).bit_length() - 1)))  # a power of two
    _kron_merge_tile_kernel[(F._cdiv(rows, br), F._cdiv(co, bcol))](w, w1, w2, out, rows, co, K, C, float(s),
                                                                *w1.stride(), *w2.stride(), BR=br, BCOL=bcol,
                                                                num_warps=num_warps)
    return out


def merge_flat(w, w1, w2, s, block=2048):
    """The library's flat launch at ``block`` elements a program."""
    L, K, M, C = w.shape
    out = torch.empty_like(w)
    F._kron_merge_kernel[(F._cdiv(w.numel(), block),)](w, w1, w2, out, w.numel(), K, M, C, float(s), *w1.stride(),
                                                       *w2.stride(), BLOCK=block)
    return out


def merge_tiled(w, w1, w2, s, elements=4096, cols=256, warps=4):
    """The tiled launch at the given tile and warps."""
    return _kron_merge_tiled(w, w1, w2, s, torch.empty_like(w), elements, cols, warps)


def reference(w, w1, w2, s):
    """``W + s·W1[i, j]·W2[k, c]`` in float64."""
    return w.double() + s * w1.double()[:, None, :, None] * w2.double()[None, :, None, :]


def _inputs(shape, dev, g, dtype):
    L, K, M, C = shape
    w = torch.randn(L, K, M, C, generator=g, device=dev).to(dtype)
    return w, torch.randn(L, M, generator=g, device=dev) * 0.1, torch.randn(K, C, generator=g, device=dev) * 0.1


def _err(got, want):
    return float((got.double() - want).abs().max() / want.abs().max())


def check() -> None:
    """CPU, Triton's interpreter: both forms at several tiles against float64, ragged shapes and a transposed W2."""
    g = torch.Generator().manual_seed(11)
    worst = 0.0
    for shape in ((2, 5, 3, 7), (4, 40, 4, 40), (3, 9, 6, 33), (1, 130, 2, 3)):
        w, w1, w2 = _inputs(shape, torch.device("cpu"), g, torch.float32)
        for b in (w2, w2.t().contiguous().t()):
            want = reference(w, w1, b, 0.7)
            outs = [merge_flat(w, w1, b, 0.7, 64)]
            outs += [merge_tiled(w, w1, b, 0.7, el, cols, 4) for el, cols in ((64, 16), (256, 32), (4096, 256))]
            for got in outs:
                worst = max(worst, _err(got, want))
    assert worst < 1e-6, worst
    print(f"check ok: worst relative error {worst:.2e}")


def bench(out_path=None) -> None:
    from _common import shape_table, write_records
    from kron_direct_shapes import LAYERS
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    cfgs = {f"flat{b}": (lambda w, a, c, b=b: merge_flat(w, a, c, 0.5, b)) for b in FLAT_BLOCKS}
    cfgs.update({f"tile{el}c{cols}w{wp}": (lambda w, a, c, el=el, cols=cols, wp=wp:
                                          merge_tiled(w, a, c, 0.5, el, cols, wp)) for el, cols, wp in TILE_CFGS})

    def make(inp, out):
        shape = (*factorization(out, 8), *factorization(inp, 8))
        args = _inputs(shape, dev, g, torch.bfloat16)
        return args, reference(*args, 0.5), shape

    # TB/s: W read and W′ written, bf16
    write_records(out_path, shape_table(LAYERS, cfgs, make, _err, lambda us, args: 4 * args[0].numel() / us / 1e6),
                  dev)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    check() if a.check else bench(a.out or None)

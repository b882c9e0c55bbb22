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
one-pass form (:func:`_kron_wgrad_onepass` here; change 182, in the library off by default in session 48, taken out
after run 339) writes no partials and has no finish: ∂W2's programs loop over W1's rows, one program per entry of ∂W1
reads its (k, c) slab. Run 339 (H200): summed over SDXL's layers the block form at 4096 (k, c) elements and 8 warps
6.63 ms, the one-pass form 13.69 at its best of six configurations (SD1.5: 1.41 and 2.13).

For each shape of SD1.5's and SDXL's linear layers at factor 8 (``kron_direct_shapes.LAYERS``), µs a call (10 calls in
one CUDA graph, median of 7 replays) of each configuration, after checking it against float64; then per model the µs
summed over its layers (SDXL b1's counts) for each configuration, and the best per shape.

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/experiments/kron_wgrad_tiles.py --check
    PYTHONPATH=src python benchmarks/experiments/kron_wgrad_tiles.py [--out FILE]
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


#: the library kernel's tile sizes (elements of a (k, c) tile) and the block form's (tile, warps)
LOOP_TILES = (512, 1024, 2048, 4096)
BLOCK_CFGS = ((256, 4), (512, 4), (512, 8), (1024, 8), (2048, 8), (2048, 4), (2048, 16), (4096, 8), (4096, 16),
              (8192, 16))
#: the one-pass form's (∂W2 tile, ∂W1 tile, warps): (k, c) elements a program (factor_triton._kron_wgrad_onepass)
ONEPASS_CFGS = ((256, 4096, 4), (512, 4096, 4), (512, 4096, 8), (1024, 4096, 8), (512, 2048, 4), (512, 8192, 8))


@triton.jit
def _kron_wgrad_onepass_kernel(E, W1, W2, G1, G2, L, K, M, C, sw1i, sw1j, sw2k, sw2c, s, NCB, N2,
                               BK: tl.constexpr, BC: tl.constexpr, MP: tl.constexpr, BK1: tl.constexpr,
                               BC1: tl.constexpr):
    """:func:`kron_weight_grads` in one launch without partials: the first ``N2`` programs one ``(BK, BC)`` tile
    of ``G2 = s·Σ_ij W1[i,j]·E[i,k,j,c]`` each — over W1's rows in order, a ``(BK, MP, BC)`` block of E a row —,
    the rest one entry ``G1[i,j] = s·Σ_kc E[i,k,j,c]·W2[k,c]`` each, over (k, c) in ``(BK1, BC1)`` tiles; the
    fp32 sums scaled and rounded once to each factor's dtype (fixed order: deterministic). E is read twice, once
    by each group."""
    pid = tl.program_id(0)
    if pid < N2:
        kk = (pid // NCB) * BK + tl.arange(0, BK)
        cc = (pid % NCB) * BC + tl.arange(0, BC)
        jj = tl.arange(0, MP)
        m2 = (kk[:, None] < K) & (cc[None, :] < C)
        m3 = m2[:, None, :] & (jj[None, :, None] < M)
        off = (kk[:, None, None].to(tl.int64) * M + jj[None, :, None]) * C + cc[None, None, :]
        acc = tl.zeros((BK, BC), dtype=tl.float32)
        rows = E + off
        for i in range(0, L):
            e = tl.load(rows, mask=m3, other=0.0).to(tl.float32)
            w1 = tl.load(W1 + i * sw1i + jj * sw1j, mask=jj < M, other=0.0).to(tl.float32)
            acc += tl.sum(e * w1[None, :, None], axis=1)
            rows += K * M * C
        tl.store(G2 + kk[:, None] * C + cc[None, :], (acc * s).to(G2.dtype.element_ty), mask=m2)
    else:
        q = pid - N2
        i = q // M
        j = q % M
        row = E + (i.to(tl.int64) * K * M + j) * C
        acc1 = tl.zeros((BK1, BC1), dtype=tl.float32)
        for k0 in range(0, K, BK1):
            k1 = k0 + tl.arange(0, BK1)
            for c0 in range(0, C, BC1):
                c1 = c0 + tl.arange(0, BC1)
                m = (k1[:, None] < K) & (c1[None, :] < C)
                e1 = tl.load(row + k1[:, None].to(tl.int64) * M * C + c1[None, :], mask=m, other=0.0)
                w2 = tl.load(W2 + k1[:, None] * sw2k + c1[None, :] * sw2c, mask=m, other=0.0)
                acc1 += e1.to(tl.float32) * w2.to(tl.float32)
        tl.store(G1 + q, (tl.sum(tl.sum(acc1, axis=1), axis=0) * s).to(G1.dtype.element_ty))


def _kron_wgrad_onepass(e, w1, w2, s, dtypes, tile2: int, tile1: int, num_warps: int):
    """``factor_triton.kron_weight_grads`` as one launch (:func:`_kron_wgrad_onepass_kernel`): ``(BK, BC)`` tiles of
    ``tile2`` (k, c) elements for ∂W2 — a program each, over W1's L rows — and one program per entry of ∂W1, over
    (k, c) in tiles of ``tile1`` elements; no fp32 partials, no finishing launch.

    Why it was tried (session 48): the two-launch forms write fp32 partials of both and sum them
    in a second launch — run 328's SDXL b1 lokr-full timeline had that finish at 6.1 µs a layer on average (735
    layers, the loop form's partials); change 181's block form with its finish took 7.07 µs a call alone at 1280 ×
    1280 (run 335), how it splits between them not measured. Here E is read twice instead (once per group, the
    second time by inference from L2: a 1280 × 1280 bf16 ∂W′ is 3.3 MB against the H200's 50 MB), and ∂W1's programs
    are L·M (64 at factor 8), each reading K·C elements — hence the library's bound on K·C
    (``LYCO_KRON_WGRAD_ONEPASS``, while it had this form)."""
    L, K, M, C = e.shape
    mp = F._p2(M)
    bk, bc, ncb, n2 = F._wgrad_tiles(K, C, tile2)
    bc1 = min(256, F._p2(C))
    bk1 = max(1, min(F._p2(K), tile1 // bc1))
    g1 = torch.empty((L, M), dtype=dtypes[0], device=e.device)
    g2 = torch.empty((K, C), dtype=dtypes[1], device=e.device)
    _kron_wgrad_onepass_kernel[(n2 + L * M,)](e, w1, w2, g1, g2, L, K, M, C, *w1.stride(), *w2.stride(), float(s),
                                              ncb, n2, BK=bk, BC=bc, MP=mp, BK1=bk1, BC1=bc1, num_warps=num_warps)
    return g1, g2


def kron_weight_grads_block(e, w1, w2, s=1.0, dtypes=(torch.float32, torch.float32), tile=1024, warps=8):
    """:func:`factor_triton.kron_weight_grads` with :func:`_kron_wgrad_block_kernel` (``tile`` elements of (k, c) a
    program, ``warps``) and the library's finish launch."""
    return F._kron_wgrad_launch(F._kron_wgrad_block_kernel, e, w1, w2, s, dtypes, tile, MP=F._p2(e.shape[2]),
                                num_warps=warps)


def kron_weight_grads_onepass(e, w1, w2, s=1.0, dtypes=(torch.float32, torch.float32), tile2=512, tile1=4096,
                              warps=4):
    """The one-pass form (one launch, no partials) at the given tiles and warps, whatever K·C."""
    return _kron_wgrad_onepass(e, w1, w2, s, dtypes, tile2, tile1, warps)


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
    from _common import shape_table, write_records
    from kron_direct_shapes import LAYERS
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    cfgs = {f"loop{t}": (lambda e, a, b, t=t: kron_weight_grads_loop(e, a, b, 0.5, tile=t)) for t in LOOP_TILES}
    cfgs.update({f"block{t}w{w}": (lambda e, a, b, t=t, w=w: kron_weight_grads_block(e, a, b, 0.5, tile=t, warps=w))
                 for t, w in BLOCK_CFGS})
    cfgs.update({f"one{t2}t{t1}w{w}": (lambda e, a, b, t2=t2, t1=t1, w=w:
                                       kron_weight_grads_onepass(e, a, b, 0.5, tile2=t2, tile1=t1, warps=w))
                 for t2, t1, w in ONEPASS_CFGS})

    def make(inp, out):
        shape = _shape(inp, out)
        args = _inputs(shape, dev, g, torch.bfloat16)
        return args, reference(*args, 0.5), shape

    write_records(out_path, shape_table(LAYERS, cfgs, make, _err), dev)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    check() if a.check else bench(a.out or None)

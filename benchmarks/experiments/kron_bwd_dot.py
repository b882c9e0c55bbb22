#!/usr/bin/env python3
"""LoKr's stacked factor-batch backward with its two reductions as tensor-core dots (issue 7, prepared in session 45
for the next; not yet run on a GPU).

Runs 321–322 (``kron_bwd_stacked.py``) measured ``factor_triton.kron_backward_batched``'s one-read launch at 0.5–0.8
TB/s of the H200's 4.8: per ∂U tile ``(OL, BK, IM, R)`` it sums over (i, j) for ∂A and over (k, ρ) for ∂W1 — by
inference the cross-warp reductions bound it, not the reads. Here each is one ``tl.dot`` per tile of A's rows ``k``
against the columns ``c = (i, j, ρ)`` (the ∂U rows of every i for that k, gathered: OL·IM·R columns):

* ``∂A[k, ρ'] = Σ_c G[k, c]·Wx[c, ρ']`` with ``Wx[(i, j, ρ), ρ'] = W1[i, j]·[ρ = ρ']`` (built once per program);
* ``Z[ρ', c] += Σ_k A[k, ρ']·G[k, c]`` in fp32 over the program's rows, and at the end
  ``∂W1[i, j] = Σ_ρ Z[ρ, (i, j, ρ)]`` — the diagonal picked once, not per tile.

Taken where OL·IM·R (padded, R at least 16 for the dots) is at most ``MAX_COLS``. The same launch geometry as the
library's (splits of A's rows where the members are few, ∂W1's fp32 partials then summed). Checked against float64 on
the CPU in Triton's interpreter (``--check``); on the GPU it times this form, the library's one-read launch and the
two-read launch at SDXL b1 LoKr's four groups (``kron_bwd_stacked.SHAPES``).

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/experiments/kron_bwd_dot.py --check
    PYTHONPATH=src python benchmarks/experiments/kron_bwd_dot.py [--out FILE]
    PYTHONPATH=src python benchmarks/experiments/kron_bwd_dot.py --train …train_step.py args…   # the step with it
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from lyco.algorithms import factor_triton as F  # noqa: E402
from lyco.algorithms.lowrank_triton import _UPCAST, triton  # noqa: E402
from kron_bwd_stacked import reference  # noqa: E402  (benchmarks/experiments/)

import triton.language as tl  # noqa: E402

MAX_COLS = 2048
#: (rows of A per tile, warps, programs aimed at per multiprocessor)
CFG = {"BK": 16, "num_warps": 8, "per_sm": 4}


@triton.jit
def _kron_bwd_dot_kernel(W1, A, GU, GW1, GA, OL, IM, OK, R, PER, sw1b, sw1i, sw1j, sab, sak, sar, sgub, sgu0, sgu1,
                         sgw1b, sgw1s, sgab, sgak, sgar, BK: tl.constexpr, OLP: tl.constexpr, IMP: tl.constexpr,
                         RP: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    W1 += b * sw1b
    A += b * sab
    GU += b * sgub
    GA += b * sgab
    cc = tl.arange(0, OLP * IMP * RP)
    ci = cc // (IMP * RP)
    cj = (cc // RP) % IMP
    cr = cc % RP
    cm = (ci < OL) & (cj < IM) & (cr < R)
    rr = tl.arange(0, RP)
    w1c = tl.load(W1 + ci * sw1i + cj * sw1j, mask=cm, other=0.0)
    wx = tl.where(cr[:, None] == rr[None, :], w1c[:, None], tl.zeros_like(w1c)[:, None])
    if UPCAST:
        wx = wx.to(tl.float32)
    z = tl.zeros((RP, OLP * IMP * RP), dtype=tl.float32)
    lo = split * PER
    hi = tl.minimum(lo + PER, OK)
    for k0 in range(lo, hi, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < hi
        g = tl.load(GU + (ci[None, :] * OK + kk[:, None]) * sgu0 + (cj[None, :] * R + cr[None, :]) * sgu1,
                    mask=km[:, None] & cm[None, :], other=0.0)
        a = tl.load(A + kk[:, None] * sak + rr[None, :] * sar, mask=km[:, None] & (rr[None, :] < R), other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            a = a.to(tl.float32)
        ga = tl.dot(g, wx)
        tl.store(GA + kk[:, None] * sgak + rr[None, :] * sgar, ga.to(GA.dtype.element_ty),
                 mask=km[:, None] & (rr[None, :] < R))
        z += tl.dot(tl.trans(a), g)
    d = tl.sum(tl.where(rr[:, None] == cr[None, :], z, 0.0), axis=0)
    gw = tl.sum(tl.reshape(d, (OLP * IMP, RP)), axis=1)
    q = tl.arange(0, OLP * IMP)
    qi = q // IMP
    qj = q % IMP
    out = GW1 + b * sgw1b + split * sgw1s + qi * IM + qj
    om = (qi < OL) & (qj < IM)
    if SPLIT:
        tl.store(out, gw, mask=om)
    else:
        tl.store(out, gw.to(GW1.dtype.element_ty), mask=om)


def usable(w1, a) -> bool:
    _, ol, im = w1.shape
    r = a.shape[2]
    return F._p2(ol) * F._p2(im) * max(16, F._p2(r)) <= MAX_COLS


def kron_backward_dot(w1, a, gu, cfg=None):
    """``(∂W1, ∂A)`` stacked, as ``factor_triton.kron_backward_batched`` (module doc; its launch geometry)."""
    cfg = CFG if cfg is None else cfg
    _, ol, im = w1.shape
    rp = max(16, F._p2(a.shape[2]))
    return F.stacked_launch(_kron_bwd_dot_kernel, w1, a, gu, cfg["BK"], cfg["per_sm"], cfg["num_warps"],
                            OLP=F._p2(ol), IMP=F._p2(im), RP=rp, UPCAST=_UPCAST)


def check() -> None:
    """CPU, Triton's interpreter: the dot form against float64 at small ragged shapes, split and not."""
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    for n, ol, im, ok, r in ((3, 8, 8, 40, 16), (20, 3, 5, 37, 6), (2, 4, 4, 50, 16), (17, 8, 8, 33, 16)):
        w1, a = torch.randn(n, ol, im, generator=g), torch.randn(n, ok, r, generator=g)
        gu = torch.randn(n, ol * ok, im * r, generator=g)
        assert usable(w1, a)
        for got, want in zip(kron_backward_dot(w1, a, gu), reference(w1, a, gu)):
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            worst = max(worst, err)
            assert err < 1e-5, (n, ol, im, ok, r, err)
    print(f"check ok: worst relative error {worst:.2e}")


def bench(out_path=None) -> None:
    from _common import write_records
    from kron_bwd_stacked import SHAPES, inputs, time_form
    dev = torch.device("cuda")
    recs = []
    for shape in SHAPES:
        w1, a, gu = inputs(shape, dev)
        want = [t.float() for t in reference(w1, a, gu)]
        rec = dict(zip(("n", "ol", "im", "ok", "r"), shape))
        forms = {"two_read": F._kron_backward_batched_two_reads, "one_read": F.kron_backward_batched,
                 "dot": kron_backward_dot}
        for bk, warps in ((32, 8), (16, 4), (64, 8)):
            forms[f"dot_bk{bk}_w{warps}"] = (lambda w1, a, gu, bk=bk, warps=warps: kron_backward_dot(
                w1, a, gu, dict(CFG, BK=bk, num_warps=warps)))
        for name, fn in forms.items():
            try:
                time_form(fn, w1, a, gu, want, rec, name)
            except Exception as e:  # noqa: BLE001 — a form Triton cannot compile here: recorded, the rest timed
                rec[name + "_us"] = f"failed: {type(e).__name__}: {str(e)[:80]}"
        recs.append(rec)
        print(json.dumps(rec), flush=True)
    write_records(out_path, recs, dev)


def _with_dot(w1, a, gu, _library=F.kron_backward_batched):
    """The library's stacked backward with the dot form where it takes the shapes (``--train``)."""
    return kron_backward_dot(w1, a, gu) if usable(w1, a) else _library(w1, a, gu)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--train":  # train_step.py with the dot form in the factor batch
        import train_step
        F.kron_backward_batched = _with_dot
        sys.argv = [sys.argv[0]] + sys.argv[2:]
        train_step.main()
        sys.exit(0)
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    check() if args.check else bench(args.out)

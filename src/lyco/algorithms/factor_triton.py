"""Triton kernels for the small factor products LoHa and LoKr build every step, forward and backward, on CUDA:

* LoHa's Khatri–Rao pair (:func:`khatri_rao`): ``Ka[o, i·r2+j] = a1[o,i]·a2[o,j]`` ``(out, r1·r2)`` and
  ``Kb[i·r2+j, c] = b1[i,c]·b2[j,c]`` ``(r1·r2, n)`` — the up and down of LoHa's rank-r1·r2 LoRA form
  (:mod:`.loha`); backward ``∂a1[o,i] = Σ_j ∂Ka[o,i,j]·a2[o,j]``, ``∂a2[o,j] = Σ_i ∂Ka[o,i,j]·a1[o,i]``, and
  the same over columns for b1, b2.
* LoKr's up (:func:`kron_up`): ``U[(i,k),(j,ρ)] = W1[i,j]·A[k,ρ]`` ``(out_l·out_k, in_m·r)`` — the up of
  LoKr's low-rank form (:mod:`.lokr`); backward ``∂A[k,ρ] = Σ_ij ∂U[i,k,j,ρ]·W1[i,j]`` (programs over A's
  rows) and ``∂W1[i,j] = Σ_kρ ∂U[i,k,j,ρ]·A[k,ρ]`` (one program per entry of W1, over every k in a fixed
  order: deterministic), in one launch.
* LoKr's rebuilt op: the merged weight ``W + s·kron(W1, W2)`` in one pass (:func:`kron_merge`), and backward
  ``∂W1``, ``∂W2`` from its gradient E in one pass over E (:func:`kron_weight_grads`).

Why: in torch these are broadcast multiplies forward and, through autograd, a multiply and a reduction per
factor backward — generic strided kernels, ≈ 4.5 µs each at these sizes. GPU run 52 (H100, SD1.5 b8,
``results/run52_h100_kr_cost/``): LoHa's step as one CUDA graph 98.65 ms against 90.59 for a plain LoRA of
the same GEMM shapes (``benchmarks/experiments/extra_algos.py``: ``lora-kr``) — the Khatri–Rao products
cost 8.1 ms per step over 242 layers (1484 multiplies and 808 reductions in the profile). Here: one launch
forward and one backward per layer and factor pair (both products of a pair in one launch); LoKr's backward
reads ∂U twice (its ∂A and its ∂W1 programs; U is at most 5120 × 128 at SD1.5, from L2), its stacked batch's
(:mod:`.factor_batch`: hundreds of members, ∂U past L2) once (:func:`kron_backward_batched`).

Numerics: forward bit-identical to torch (the product of two bf16/fp16 numbers is exact in fp32 and
rounded once, as torch's multiply does); backward sums the products in fp32 and rounds once (torch rounds
each product to the dtype first, then sums in fp32) — at least as accurate; tests compare both with
float64 definitions.

When: a Triton launch costs the host more than the torch ops it replaces (each launch binds 13–31 arguments
in Python), so where a step is issued eagerly and the host is the bottleneck — every eager step measured on
the H100 hosts — the kernels lose what they win on the device: SDXL b4 (runs 60–61) LoKr eagerly 576 ms on
the torch path against 659–670 with the kernels, as one CUDA graph 275.4 against 257.0. So by default
(``LYCO_FACTOR_KERNELS=graph``, :mod:`.graph_policy`) they run only inside :func:`.graph_policy.graph_step`: the steps a caller is about to capture
as a CUDA graph, where the host's cost is paid once (lyco's trainer wraps its warm-up and capture in it, the
benchmark its graph column). ``LYCO_FACTOR_KERNELS=1`` uses them everywhere, ``0`` nowhere.

Selected by :func:`usable`: :func:`.lowrank_triton.enabled` (Triton, CUDA bf16/fp16, ``LYCO_TRITON`` not
``0``, not under ``torch.compile``), the padded inner sizes within the tiles below, the policy above, and this
family's self-test passed on the device and dtype (once per process, :func:`.lowrank_triton.gate`). Everything
else — the CPU, fp32, compile, eager steps by default — takes the torch forms in :mod:`.loha` and
:mod:`.lokr`. CPU tests run the kernels in Triton's interpreter.
"""

from __future__ import annotations

import torch

from . import graph_policy
from .lowrank_triton import _cdiv, enabled, gate, self_test, sm_count, triton

if triton is not None:
    import triton.language as tl

#: elements of one program's product tile (rows × r1 × r2, or A's rows × in_m × r) at most; padded inner tiles
#: above half of it take the torch path
_TILE = 4096
#: launch geometry: ``kr_tile`` elements of a Khatri–Rao program's tile (rows or columns × r1·r2), and the
#: number of programs the kron kernels spread A's rows over. Run 54's first geometry (4096-element tiles, up to
#: 64 rows of A per program looping over W1's rows both ways, ∂W1 from per-program partials summed and cast
#: by torch: few programs, three kernels) ran 7–7.6 µs per launch; ``benchmarks/factor_kernel_bench.py`` over
#: SD1.5's 242 layers as one CUDA graph (runs 55–56, H100): Khatri–Rao 1.36–1.45 ms per step for tiles of
#: 256–1024 (4096: 1.72; torch 7.12), kron 1.57–1.67 ms for 64–256 programs (32: 2.05; torch 6.39).
_CFG = {"kr_tile": 512, "kron_programs": 128}
#: (device, dtype) → whether this family passed its self-test there (once per process)
_CHECKED: dict = {}
_GEOM: dict = {}


def _p2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def wanted() -> bool:
    """The policy of the module doc, from ``LYCO_FACTOR_KERNELS`` (``graph`` when unset; :mod:`.graph_policy`)."""
    return graph_policy.wanted("LYCO_FACTOR_KERNELS")


def usable(t: torch.Tensor, inner: int) -> bool:
    """Whether the kernels take factors like ``t`` whose padded inner tile (``r1·r2`` padded per factor, or
    ``in_m·r``) is ``inner`` elements: :func:`.lowrank_triton.enabled`, ``inner`` at most half a tile, the policy
    (:func:`wanted`), and the self-test passed on this device and dtype."""
    return (enabled(t) and inner * 2 <= _TILE and wanted()
            and gate(_CHECKED, t.device, t.dtype, _self_test))


def _self_test(device, dtype) -> bool:
    return self_test(device, dtype, _compare, "the Khatri–Rao/Kronecker Triton kernels")


def _compare(device, dtype) -> str | None:
    """Both families, with power-of-two and ragged sizes, against fp32 torch math: None, or the worst error."""
    g = torch.Generator().manual_seed(7)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    errs = []
    for out, r1, r2, n in ((48, 8, 8, 300), (33, 3, 5, 129)):
        a1, a2, b1, b2 = rnd(out, r1), rnd(out, r2), rnd(r1, n), rnd(r2, n)
        gka, gkb = rnd(out, r1 * r2), rnd(r1 * r2, n)
        ka, kb = _kr_forward(a1, a2, b1, b2)
        grads = _kr_backward(a1, a2, b1, b2, gka, gkb)
        A1, A2, B1, B2, GA, GB = (t.float() for t in (a1, a2, b1, b2, gka, gkb))
        errs += [(ka, (A1[:, :, None] * A2[:, None, :]).reshape(out, -1)),
                 (kb, (B1[:, None] * B2[None]).reshape(-1, n)),
                 (grads[0], (GA.view(out, r1, r2) * A2[:, None]).sum(2)),
                 (grads[1], (GA.view(out, r1, r2) * A1[:, :, None]).sum(1)),
                 (grads[2], (GB.view(r1, r2, n) * B2[None]).sum(1)),
                 (grads[3], (GB.view(r1, r2, n) * B1[:, None]).sum(0))]
    for ol, im, ok, r in ((8, 8, 40, 16), (3, 5, 7, 6)):
        w1, a, gu = rnd(ol, im), rnd(ok, r), rnd(ol * ok, im * r)
        u = _kron_forward(w1, a)
        gw1, ga = _kron_backward(w1, a, gu)
        W1, A, GU = w1.float(), a.float(), gu.float().view(ol, ok, im, r)
        errs += [(u, (W1[:, None, :, None] * A[None, :, None, :]).reshape(ol * ok, im * r)),
                 (gw1, (GU * A[None, :, None, :]).sum((1, 3))), (ga, (GU * W1[:, None, :, None]).sum((0, 2)))]
        # the stacked batch's backward (one member repeated: its rows split over programs, and not)
        for n in (2, 4 * sm_count(device)):
            gw1b, gab = kron_backward_batched(w1.expand(n, ol, im).contiguous(), a.expand(n, ok, r).contiguous(),
                                              gu.expand(n, ol * ok, im * r).contiguous())
            errs += [(gw1b[n - 1], (GU * A[None, :, None, :]).sum((1, 3))),
                     (gab[n - 1], (GU * W1[:, None, :, None]).sum((0, 2)))]
    for ol, ok, im, c in ((8, 40, 8, 360), (3, 5, 7, 130)):
        e, w1, w2 = rnd(ol, ok, im, c), rnd(ol, im), rnd(ok, c)
        g1, g2 = kron_weight_grads(e, w1, w2, 0.5, (dtype, torch.float32))
        E, W1, W2 = e.float(), w1.float(), w2.float()
        errs += [(g1, 0.5 * (E * W2[None, :, None, :]).sum((1, 3))), (g2, 0.5 * (E * W1[:, None, :, None]).sum((0, 2))),
                 (kron_merge(e, w1, w2, 0.5), E + 0.5 * W1[:, None, :, None] * W2[None, :, None, :])]
    worst = max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in errs)
    return None if worst <= 2e-2 else f"their self-test's relative error is {worst:.2e}"


if triton is not None:

    # Each half of a launch is its own function: Triton merges the variables of an ``if``'s two branches, so
    # tiles of different shapes under one name in both would not compile (caught by run 53's self-test).
    @triton.jit
    def _rows_fwd(A1, A2, KA, M, R1, R2, sa1m, sa1r, sa2m, sa2r, pid,
                  BM: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr):
        ii = tl.arange(0, R1P)
        jj = tl.arange(0, R2P)
        rows = pid * BM + tl.arange(0, BM)
        rm = rows < M
        a1 = tl.load(A1 + rows[:, None] * sa1m + ii[None, :] * sa1r, mask=rm[:, None] & (ii[None, :] < R1),
                     other=0.0).to(tl.float32)
        a2 = tl.load(A2 + rows[:, None] * sa2m + jj[None, :] * sa2r, mask=rm[:, None] & (jj[None, :] < R2),
                     other=0.0).to(tl.float32)
        k = a1[:, :, None] * a2[:, None, :]
        tl.store(KA + rows[:, None, None] * (R1 * R2) + ii[None, :, None] * R2 + jj[None, None, :],
                 k.to(KA.dtype.element_ty),
                 mask=rm[:, None, None] & (ii[None, :, None] < R1) & (jj[None, None, :] < R2))

    @triton.jit
    def _cols_fwd(B1, B2, KB, N, R1, R2, sb1r, sb1n, sb2r, sb2n, pid,
                  BN: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr):
        ii = tl.arange(0, R1P)
        jj = tl.arange(0, R2P)
        cols = pid * BN + tl.arange(0, BN)
        cm = cols < N
        b1 = tl.load(B1 + ii[:, None] * sb1r + cols[None, :] * sb1n, mask=(ii[:, None] < R1) & cm[None, :],
                     other=0.0).to(tl.float32)
        b2 = tl.load(B2 + jj[:, None] * sb2r + cols[None, :] * sb2n, mask=(jj[:, None] < R2) & cm[None, :],
                     other=0.0).to(tl.float32)
        k = b1[:, None, :] * b2[None, :, :]
        tl.store(KB + (ii[:, None, None] * R2 + jj[None, :, None]) * N + cols[None, None, :],
                 k.to(KB.dtype.element_ty),
                 mask=(ii[:, None, None] < R1) & (jj[None, :, None] < R2) & cm[None, None, :])

    @triton.jit
    def _kr_member(A1, A2, B1, B2, KA, KB, M, N, R1, R2):
        """The six pointers (a1, a2, b1, b2, Ka, Kb — or their gradients, which have the same shapes) moved to member
        program_id(1) of a stacked contiguous batch."""
        b = tl.program_id(1).to(tl.int64)
        return (A1 + b * M * R1, A2 + b * M * R2, B1 + b * R1 * N, B2 + b * R2 * N, KA + b * M * R1 * R2,
                KB + b * R1 * R2 * N)

    @triton.jit
    def _kr_fwd_kernel(A1, A2, B1, B2, KA, KB, M, N, R1, R2, sa1m, sa1r, sa2m, sa2r, sb1r, sb1n, sb2r, sb2n, NBM,
                       BM: tl.constexpr, BN: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr):
        """Programs < NBM: BM rows of Ka; the others: BN columns of Kb (both contiguous). program_id(1): the member
        of a stacked batch (every operand then contiguous; one layer: member 0, any strides)."""
        pid = tl.program_id(0)
        A1, A2, B1, B2, KA, KB = _kr_member(A1, A2, B1, B2, KA, KB, M, N, R1, R2)
        if pid < NBM:
            _rows_fwd(A1, A2, KA, M, R1, R2, sa1m, sa1r, sa2m, sa2r, pid, BM, R1P, R2P)
        else:
            _cols_fwd(B1, B2, KB, N, R1, R2, sb1r, sb1n, sb2r, sb2n, pid - NBM, BN, R1P, R2P)

    @triton.jit
    def _rows_bwd(A1, A2, GKA, GA1, GA2, M, R1, R2, sa1m, sa1r, sa2m, sa2r, sgam, sgar, pid,
                  BM: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr):
        ii = tl.arange(0, R1P)
        jj = tl.arange(0, R2P)
        rows = pid * BM + tl.arange(0, BM)
        rm = rows < M
        m1 = rm[:, None] & (ii[None, :] < R1)
        m2 = rm[:, None] & (jj[None, :] < R2)
        a1 = tl.load(A1 + rows[:, None] * sa1m + ii[None, :] * sa1r, mask=m1, other=0.0).to(tl.float32)
        a2 = tl.load(A2 + rows[:, None] * sa2m + jj[None, :] * sa2r, mask=m2, other=0.0).to(tl.float32)
        g = tl.load(GKA + rows[:, None, None] * sgam + (ii[None, :, None] * R2 + jj[None, None, :]) * sgar,
                    mask=rm[:, None, None] & (ii[None, :, None] < R1) & (jj[None, None, :] < R2),
                    other=0.0).to(tl.float32)
        ga1 = tl.sum(g * a2[:, None, :], axis=2)
        ga2 = tl.sum(g * a1[:, :, None], axis=1)
        tl.store(GA1 + rows[:, None] * R1 + ii[None, :], ga1.to(GA1.dtype.element_ty), mask=m1)
        tl.store(GA2 + rows[:, None] * R2 + jj[None, :], ga2.to(GA2.dtype.element_ty), mask=m2)

    @triton.jit
    def _cols_bwd(B1, B2, GKB, GB1, GB2, N, R1, R2, sb1r, sb1n, sb2r, sb2n, sgbr, sgbn, pid,
                  BN: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr):
        ii = tl.arange(0, R1P)
        jj = tl.arange(0, R2P)
        cols = pid * BN + tl.arange(0, BN)
        cm = cols < N
        m1 = (ii[:, None] < R1) & cm[None, :]
        m2 = (jj[:, None] < R2) & cm[None, :]
        b1 = tl.load(B1 + ii[:, None] * sb1r + cols[None, :] * sb1n, mask=m1, other=0.0).to(tl.float32)
        b2 = tl.load(B2 + jj[:, None] * sb2r + cols[None, :] * sb2n, mask=m2, other=0.0).to(tl.float32)
        g = tl.load(GKB + (ii[:, None, None] * R2 + jj[None, :, None]) * sgbr + cols[None, None, :] * sgbn,
                    mask=(ii[:, None, None] < R1) & (jj[None, :, None] < R2) & cm[None, None, :],
                    other=0.0).to(tl.float32)
        gb1 = tl.sum(g * b2[None, :, :], axis=1)
        gb2 = tl.sum(g * b1[:, None, :], axis=0)
        tl.store(GB1 + ii[:, None] * N + cols[None, :], gb1.to(GB1.dtype.element_ty), mask=m1)
        tl.store(GB2 + jj[:, None] * N + cols[None, :], gb2.to(GB2.dtype.element_ty), mask=m2)

    @triton.jit
    def _kr_bwd_kernel(A1, A2, B1, B2, GKA, GKB, GA1, GA2, GB1, GB2, M, N, R1, R2,
                       sa1m, sa1r, sa2m, sa2r, sb1r, sb1n, sb2r, sb2n, sgam, sgar, sgbr, sgbn, NBM,
                       BM: tl.constexpr, BN: tl.constexpr, R1P: tl.constexpr, R2P: tl.constexpr):
        """Programs < NBM: ∂a1, ∂a2 on BM rows from ∂Ka; the others: ∂b1, ∂b2 on BN columns from ∂Kb
        (outputs contiguous). program_id(1): the member of a stacked batch (as the forward)."""
        pid = tl.program_id(0)
        A1, A2, B1, B2, GKA, GKB = _kr_member(A1, A2, B1, B2, GKA, GKB, M, N, R1, R2)
        GA1, GA2, GB1, GB2, _, _ = _kr_member(GA1, GA2, GB1, GB2, GKA, GKB, M, N, R1, R2)
        if pid < NBM:
            _rows_bwd(A1, A2, GKA, GA1, GA2, M, R1, R2, sa1m, sa1r, sa2m, sa2r, sgam, sgar, pid, BM, R1P, R2P)
        else:
            _cols_bwd(B1, B2, GKB, GB1, GB2, N, R1, R2, sb1r, sb1n, sb2r, sb2n, sgbr, sgbn, pid - NBM, BN, R1P, R2P)

    @triton.jit
    def _kron_fwd_kernel(W1, A, U, IM, OK, R, sw1i, sw1j, sak, sar, sw1b, sab, sub,
                         BK: tl.constexpr, IMP: tl.constexpr, RP: tl.constexpr):
        """Program (k block, i, b): U[(i,k),(j,ρ)] = W1[i,j]·A[k,ρ] for BK rows k of A (U contiguous) of member b
        of a stacked batch (batch strides 0: one layer)."""
        kk = tl.program_id(0) * BK + tl.arange(0, BK)
        i = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        W1 += b * sw1b
        A += b * sab
        U += b * sub
        jj = tl.arange(0, IMP)
        rr = tl.arange(0, RP)
        km = kk < OK
        a = tl.load(A + kk[:, None] * sak + rr[None, :] * sar, mask=km[:, None] & (rr[None, :] < R),
                    other=0.0).to(tl.float32)
        w1 = tl.load(W1 + i * sw1i + jj * sw1j, mask=jj < IM, other=0.0).to(tl.float32)
        u = w1[None, :, None] * a[:, None, :]
        tl.store(U + (i * OK + kk[:, None, None]) * (IM * R) + jj[None, :, None] * R + rr[None, None, :],
                 u.to(U.dtype.element_ty),
                 mask=km[:, None, None] & (jj[None, :, None] < IM) & (rr[None, None, :] < R))

    @triton.jit
    def _gu_tile(GU, ii, kk, jj, rr, km, OL, OK, IM, R, sgu0, sgu1):
        """The fp32 ∂U tile ``(i, k, j, ρ)`` of rows ``i·OK + k`` and columns ``j·R + ρ`` (k where ``km``), zero
        outside."""
        return tl.load(GU + (ii[:, None, None, None] * OK + kk[None, :, None, None]) * sgu0
                       + (jj[None, None, :, None] * R + rr[None, None, None, :]) * sgu1,
                       mask=(ii[:, None, None, None] < OL) & km[None, :, None, None]
                       & (jj[None, None, :, None] < IM) & (rr[None, None, None, :] < R),
                       other=0.0).to(tl.float32)

    @triton.jit
    def _kron_grad_a(W1, GU, GA, OL, IM, OK, R, sw1i, sw1j, sgu0, sgu1, pid,
                     BK: tl.constexpr, IMP: tl.constexpr, RP: tl.constexpr, OLP: tl.constexpr):
        """∂A[k,ρ] = Σ_ij ∂U[i,k,j,ρ]·W1[i,j] for BK rows k: with OLP > 0 every row i of W1 in one
        (OLP, BK, IMP, RP) tile — no chain of dependent loads — else row by row."""
        kk = pid * BK + tl.arange(0, BK)
        jj = tl.arange(0, IMP)
        rr = tl.arange(0, RP)
        km = kk < OK
        if OLP > 0:
            ii = tl.arange(0, OLP)
            w1 = tl.load(W1 + ii[:, None] * sw1i + jj[None, :] * sw1j,
                         mask=(ii[:, None] < OL) & (jj[None, :] < IM), other=0.0).to(tl.float32)
            g = _gu_tile(GU, ii, kk, jj, rr, km, OL, OK, IM, R, sgu0, sgu1)
            ga = tl.sum(tl.sum(g * w1[:, None, :, None], axis=2), axis=0)
        else:
            tmask = km[:, None, None] & (jj[None, :, None] < IM) & (rr[None, None, :] < R)
            ga = tl.zeros((BK, RP), dtype=tl.float32)
            for i in range(0, OL):
                w1 = tl.load(W1 + i * sw1i + jj * sw1j, mask=jj < IM, other=0.0).to(tl.float32)
                g = tl.load(GU + (i * OK + kk[:, None, None]) * sgu0
                            + (jj[None, :, None] * R + rr[None, None, :]) * sgu1,
                            mask=tmask, other=0.0).to(tl.float32)
                ga += tl.sum(g * w1[None, :, None], axis=1)
        tl.store(GA + kk[:, None] * R + rr[None, :], ga.to(GA.dtype.element_ty),
                 mask=km[:, None] & (rr[None, :] < R))

    @triton.jit
    def _kron_grad_w1(A, GU, GW1, IM, OK, R, sak, sar, sgu0, sgu1, q,
                      BKW: tl.constexpr, RP: tl.constexpr):
        """∂W1[i,j] = Σ_kρ ∂U[i,k,j,ρ]·A[k,ρ] for one entry q = i·in_m + j, over every k in blocks of BKW (a
        fixed order)."""
        i = q // IM
        j = q % IM
        rr = tl.arange(0, RP)
        acc = tl.zeros((BKW, RP), dtype=tl.float32)
        for k0 in range(0, OK, BKW):
            kk = k0 + tl.arange(0, BKW)
            m = (kk[:, None] < OK) & (rr[None, :] < R)
            a = tl.load(A + kk[:, None] * sak + rr[None, :] * sar, mask=m, other=0.0).to(tl.float32)
            g = tl.load(GU + (i * OK + kk[:, None]) * sgu0 + (j * R + rr[None, :]) * sgu1, mask=m,
                        other=0.0).to(tl.float32)
            acc += g * a
        tl.store(GW1 + q, tl.sum(tl.sum(acc, axis=1), axis=0).to(GW1.dtype.element_ty))

    @triton.jit
    def _kron_bwd_kernel(W1, A, GU, GW1, GA, OL, IM, OK, R, sw1i, sw1j, sak, sar, sgu0, sgu1, NKB,
                         sw1b, sab, sgub, sgw1b, sgab,
                         BK: tl.constexpr, BKW: tl.constexpr, IMP: tl.constexpr, RP: tl.constexpr,
                         OLP: tl.constexpr):
        """Programs < NKB: ∂A on BK rows of A each; the out_l·in_m others: one entry of ∂W1 each (outputs
        contiguous, no partial sums left for the caller); program_id(1): the member of a stacked batch."""
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        W1 += b * sw1b
        A += b * sab
        GU += b * sgub
        GW1 += b * sgw1b
        GA += b * sgab
        if pid < NKB:
            _kron_grad_a(W1, GU, GA, OL, IM, OK, R, sw1i, sw1j, sgu0, sgu1, pid, BK, IMP, RP, OLP)
        else:
            _kron_grad_w1(A, GU, GW1, IM, OK, R, sak, sar, sgu0, sgu1, pid - NKB, BKW, RP)

    @triton.jit
    def _kron_bwd_stacked_kernel(W1, A, GU, GW1, GA, OL, IM, OK, R, PER, sw1b, sw1i, sw1j, sab, sak, sar, sgub,
                                 sgu0, sgu1, sgw1b, sgw1s, sgab, sgak, sgar, BK: tl.constexpr, OLP: tl.constexpr,
                                 IMP: tl.constexpr, RP: tl.constexpr, SPLIT: tl.constexpr):
        """A stacked batch's backward reading ∂U once (:func:`kron_backward_batched`): program (split, member b)
        takes A's rows ``[split·PER, +PER)`` in blocks of BK, each block's ∂U tile ``(OL, BK, IM, R)`` — rows of
        ∂U read whole — giving those rows of ∂A (every i, j summed) and adding into this program's ∂W1 (OL, IM)
        in fp32; that is stored, rounded, where the rows are not split, else as this split's fp32 partial (the caller
        sums the splits in order)."""
        split = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        W1 += b * sw1b
        A += b * sab
        GU += b * sgub
        GA += b * sgab
        ii = tl.arange(0, OLP)
        jj = tl.arange(0, IMP)
        rr = tl.arange(0, RP)
        wm = (ii[:, None] < OL) & (jj[None, :] < IM)
        w1 = tl.load(W1 + ii[:, None] * sw1i + jj[None, :] * sw1j, mask=wm, other=0.0).to(tl.float32)
        gw1 = tl.zeros((OLP, IMP), dtype=tl.float32)
        lo = split * PER
        hi = tl.minimum(lo + PER, OK)
        for k0 in range(lo, hi, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < hi
            am = km[:, None] & (rr[None, :] < R)
            a = tl.load(A + kk[:, None] * sak + rr[None, :] * sar, mask=am, other=0.0).to(tl.float32)
            g = _gu_tile(GU, ii, kk, jj, rr, km, OL, OK, IM, R, sgu0, sgu1)
            ga = tl.sum(tl.sum(g * w1[:, None, :, None], axis=2), axis=0)
            tl.store(GA + kk[:, None] * sgak + rr[None, :] * sgar, ga.to(GA.dtype.element_ty), mask=am)
            gw1 += tl.sum(tl.sum(g * a[None, :, None, :], axis=3), axis=1)
        out = GW1 + b * sgw1b + split * sgw1s + ii[:, None] * IM + jj[None, :]
        if SPLIT:
            tl.store(out, gw1, mask=wm)
        else:
            tl.store(out, gw1.to(GW1.dtype.element_ty), mask=wm)


    @triton.jit
    def _kron_wgrad_kernel(E, W1, W2, P1, P2, K, M, C, sw1i, sw1j, sw2k, sw2c, NCB,
                           BK: tl.constexpr, BC: tl.constexpr):
        """One (BK, BC) tile of (k, c) and one row i of W1: over j, ``E[i, k, j, c]`` read once —
        ``P2[i, k, c] = Σ_j W1[i,j]·E[i,k,j,c]`` and ``P1[tile, i, j] = Σ_kc E[i,k,j,c]·W2[k,c]`` (fp32 partials; the
        caller sums P2 over i and P1 over the tiles, in a fixed order: deterministic)."""
        t = tl.program_id(0)
        i = tl.program_id(1)
        kk = (t // NCB) * BK + tl.arange(0, BK)
        cc = (t % NCB) * BC + tl.arange(0, BC)
        m = (kk[:, None] < K) & (cc[None, :] < C)
        w2 = tl.load(W2 + kk[:, None] * sw2k + cc[None, :] * sw2c, mask=m, other=0.0).to(tl.float32)
        rows = E + (i.to(tl.int64) * K + kk[:, None].to(tl.int64)) * M * C + cc[None, :]
        acc = tl.zeros((BK, BC), dtype=tl.float32)
        p1 = P1 + (t * tl.num_programs(1) + i) * M
        for j in range(0, M):
            e = tl.load(rows + j * C, mask=m, other=0.0).to(tl.float32)
            acc += tl.load(W1 + i * sw1i + j * sw1j).to(tl.float32) * e
            tl.store(p1 + j, tl.sum(tl.sum(e * w2, axis=1), axis=0))
        tl.store(P2 + (i * K + kk[:, None]) * C + cc[None, :], acc, mask=m)

    @triton.jit
    def _kron_wgrad_block_kernel(E, W1, W2, P1, P2, K, M, C, sw1i, sw1j, sw2k, sw2c, NCB,
                                 BK: tl.constexpr, BC: tl.constexpr, MP: tl.constexpr):
        """:func:`_kron_wgrad_kernel`'s partials with the program's ``(BK, MP, BC)`` block of E loaded at once and
        each reduced over its own axes (no loop over j: one load, two reductions)."""
        t = tl.program_id(0)
        i = tl.program_id(1)
        kk = (t // NCB) * BK + tl.arange(0, BK)
        cc = (t % NCB) * BC + tl.arange(0, BC)
        jj = tl.arange(0, MP)
        m2 = (kk[:, None] < K) & (cc[None, :] < C)
        m3 = m2[:, None, :] & (jj[None, :, None] < M)
        off = ((i.to(tl.int64) * K + kk[:, None, None].to(tl.int64)) * M + jj[None, :, None]) * C + cc[None, None, :]
        e = tl.load(E + off, mask=m3, other=0.0).to(tl.float32)
        w1 = tl.load(W1 + i * sw1i + jj * sw1j, mask=jj < M, other=0.0).to(tl.float32)
        w2 = tl.load(W2 + kk[:, None] * sw2k + cc[None, :] * sw2c, mask=m2, other=0.0).to(tl.float32)
        tl.store(P1 + (t * tl.num_programs(1) + i) * M + jj, tl.sum(tl.sum(e * w2[:, None, :], axis=2), axis=0),
                 mask=jj < M)
        tl.store(P2 + (i * K + kk[:, None]) * C + cc[None, :], tl.sum(e * w1[None, :, None], axis=1), mask=m2)

    @triton.jit
    def _sum_rows_body(P, G, T, N, s, pid, BLOCK: tl.constexpr):
        # G[n] = s·Σ_t P[t, n] for this program's n, in fp32 over t in order, rounded once to G's dtype
        off = pid * BLOCK + tl.arange(0, BLOCK)
        m = off < N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for t in range(0, T):
            acc += tl.load(P + t * N + off, mask=m, other=0.0)
        tl.store(G + off, (acc * s).to(G.dtype.element_ty), mask=m)

    @triton.jit
    def _kron_wgrad_finish_kernel(P1, P2, G1, G2, T1, T2, N1, N2, s, BLOCK: tl.constexpr):
        """Both sums of :func:`kron_weight_grads`' partials in one launch: the first programs ``G1 = s·Σ_tiles P1``,
        the rest ``G2 = s·Σ_i P2`` (a body per branch, as scale_triton's row kernels)."""
        pid = tl.program_id(0)
        nb1 = tl.cdiv(N1, BLOCK)
        if pid < nb1:
            _sum_rows_body(P1, G1, T1, N1, s, pid, BLOCK)
        else:
            _sum_rows_body(P2, G2, T2, N2, s, pid - nb1, BLOCK)

    @triton.jit
    def _kron_merge_kernel(W, W1, W2, OUT, N, K, M, C, s, sw1i, sw1j, sw2k, sw2c, BLOCK: tl.constexpr):
        """``OUT[i,k,j,c] = W[i,k,j,c] + s·W1[i,j]·W2[k,c]`` over the flat index (W and OUT contiguous), in fp32,
        rounded once."""
        off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = off < N
        c = off % C
        q = off // C
        j = q % M
        q = q // M
        k = q % K
        i = q // K
        w = tl.load(W + off, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(W1 + i * sw1i + j * sw1j, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(W2 + k * sw2k + c * sw2c, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + off, (w + s * (a * b)).to(OUT.dtype.element_ty), mask=mask)


def _kr_geometry(m: int, n: int, r1: int, r2: int):
    tile = _CFG["kr_tile"]
    key = ("kr", m, n, r1, r2, tile)
    got = _GEOM.get(key)
    if got is None:
        r1p, r2p = _p2(r1), _p2(r2)
        bm = max(2, min(128, tile // (r1p * r2p)))
        bn = max(16, min(256, tile // (r1p * r2p)))
        nbm = _cdiv(m, bm)
        got = _GEOM[key] = (nbm, nbm + _cdiv(n, bn), dict(BM=bm, BN=bn, R1P=r1p, R2P=r2p))
    return got


def _kr_forward(a1, a2, b1, b2):
    m, r1 = a1.shape
    r2, n = b2.shape
    ka = torch.empty(m, r1 * r2, dtype=a1.dtype, device=a1.device)
    kb = torch.empty(r1 * r2, n, dtype=b1.dtype, device=b1.device)
    nbm, grid, kw = _kr_geometry(m, n, r1, r2)
    _kr_fwd_kernel[(grid, 1)](a1, a2, b1, b2, ka, kb, m, n, r1, r2, *a1.stride(), *a2.stride(), *b1.stride(),
                            *b2.stride(), nbm, **kw)
    return ka, kb


def _kr_backward(a1, a2, b1, b2, gka, gkb):
    m, r1 = a1.shape
    r2, n = b2.shape
    outs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (a1, a2, b1, b2)]
    nbm, grid, kw = _kr_geometry(m, n, r1, r2)
    _kr_bwd_kernel[(grid, 1)](a1, a2, b1, b2, gka, gkb, *outs, m, n, r1, r2, *a1.stride(), *a2.stride(),
                            *b1.stride(), *b2.stride(), *gka.stride(), *gkb.stride(), nbm, **kw)
    return outs


def khatri_rao_batched(a1, a2, b1, b2):
    """LoHa's pair for stacked contiguous ``a1 (n, m, r1)``, ``a2 (n, m, r2)``, ``b1 (n, r1, c)``, ``b2 (n, r2, c)``
    in one launch → ``(Ka (n, m, r1·r2), Kb (n, r1·r2, c))`` (not differentiable; :mod:`.factor_batch` wraps it).
    The caller checks :func:`usable`."""
    n, m, r1 = a1.shape
    r2, c = b2.shape[1:]
    ka = torch.empty(n, m, r1 * r2, dtype=a1.dtype, device=a1.device)
    kb = torch.empty(n, r1 * r2, c, dtype=b1.dtype, device=b1.device)
    nbm, grid, kw = _kr_geometry(m, c, r1, r2)
    _kr_fwd_kernel[(grid, n)](a1, a2, b1, b2, ka, kb, m, c, r1, r2, *a1.stride()[1:], *a2.stride()[1:],
                              *b1.stride()[1:], *b2.stride()[1:], nbm, **kw)
    return ka, kb


def khatri_rao_backward_batched(a1, a2, b1, b2, gka, gkb):
    """``(∂a1, ∂a2, ∂b1, ∂b2)`` stacked for the stacked contiguous ``∂Ka``, ``∂Kb`` in one launch."""
    n, m, r1 = a1.shape
    r2, c = b2.shape[1:]
    outs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (a1, a2, b1, b2)]
    nbm, grid, kw = _kr_geometry(m, c, r1, r2)
    _kr_bwd_kernel[(grid, n)](a1, a2, b1, b2, gka, gkb, *outs, m, c, r1, r2, *a1.stride()[1:], *a2.stride()[1:],
                              *b1.stride()[1:], *b2.stride()[1:], *gka.stride()[1:], *gkb.stride()[1:], nbm, **kw)
    return outs


def _kron_geometry(ok: int, im: int, r: int, ol: int):
    """``(programs over A's rows forward, kwargs forward, the same backward)``. Backward's ∂A programs take all
    of W1's rows in one tile where (rows of W1 padded)·2·in_m·r fits half a tile (``OLP``; else 0: a loop over
    W1's rows, each iteration a dependent load — run 81 had the backward at 4.3 µs per launch, the forward
    at 1.6)."""
    programs = _CFG["kron_programs"]
    key = ("kron", ok, im, r, ol, programs)
    got = _GEOM.get(key)
    if got is None:
        imp, rp, olp = _p2(im), _p2(r), _p2(ol)
        rows = _p2(_cdiv(ok, programs))
        bk = max(2, min(rows, _TILE // (imp * rp)))
        bkw = max(2, min(_p2(ok), _TILE // rp))  # ∂W1's programs: (rows of A × r) tiles
        if olp * imp * rp * 2 <= _TILE:
            bka = max(2, min(rows, _TILE // (olp * imp * rp)))
        else:
            bka, olp = bk, 0
        got = _GEOM[key] = (_cdiv(ok, bk), dict(BK=bk, IMP=imp, RP=rp),
                            _cdiv(ok, bka), dict(BK=bka, BKW=bkw, IMP=imp, RP=rp, OLP=olp))
    return got


def _kron_forward(w1, a):
    ol, im = w1.shape
    ok, r = a.shape
    u = torch.empty(ol * ok, im * r, dtype=a.dtype, device=a.device)
    nkb, kw = _kron_geometry(ok, im, r, ol)[:2]
    _kron_fwd_kernel[(nkb, ol, 1)](w1, a, u, im, ok, r, *w1.stride(), *a.stride(), 0, 0, 0, **kw)
    return u


def _kron_backward(w1, a, gu):
    ol, im = w1.shape
    ok, r = a.shape
    nkb, kw = _kron_geometry(ok, im, r, ol)[2:]
    gw1 = torch.empty(ol, im, dtype=w1.dtype, device=w1.device)
    ga = torch.empty(ok, r, dtype=a.dtype, device=a.device)
    _kron_bwd_kernel[(nkb + ol * im, 1)](w1, a, gu, gw1, ga, ol, im, ok, r, *w1.stride(), *a.stride(), *gu.stride(),
                                         nkb, 0, 0, 0, 0, 0, **kw)
    return gw1, ga


def kron_forward_batched(w1: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``U[b] = kron(W1[b], A[b])`` for stacked ``W1 (n, ol, im)``, ``A (n, ok, r)`` in one launch → ``(n, ol·ok,
    im·r)`` (not differentiable; :mod:`.factor_batch` wraps it). The caller checks :func:`usable`."""
    n, ol, im = w1.shape
    _, ok, r = a.shape
    u = torch.empty(n, ol * ok, im * r, dtype=a.dtype, device=a.device)
    nkb, kw = _kron_geometry(ok, im, r, ol)[:2]
    _kron_fwd_kernel[(nkb, ol, n)](w1, a, u, im, ok, r, *w1.stride()[1:], *a.stride()[1:], w1.stride(0),
                                   a.stride(0), u.stride(0), **kw)
    return u


#: :func:`kron_backward_batched`'s ∂U tile ``(out_l, rows of A, in_m, r)``, padded, at most (elements), its warps and
#: the programs it aims at per multiprocessor (members × splits of A's rows). Run 322 (H200, bf16, µs a call in a
#: graph) at the shapes of SDXL b1 LoKr's four groups (below): 16384 / 8 warps / 4 — 108.2, 97.9, 14.1, 15.7 — against run 321's
#: 8192 / 8 / 4 — 239.3, 217.6, 22.8, 24.4 —, 4096 / 4 / 4 (192.1, 177.3, 21.2, 23.0), 8192 / 8 / 16 (185.2, 162.4,
#: 21.4, 21.5) and 4096 / 4 / 16 (174.8, 162.3, 21.4, 21.3). Measured alone: the step with 16384 is not (the session's
#: device time was spent; with 8192 and the two-read launch past 256 rows of A it was, run 322, below).
_STACKED = {"tile": 16384, "num_warps": 8, "per_sm": 4}


def _kron_backward_batched_two_reads(w1, a, gu):
    """:func:`kron_backward_batched` in one launch whose ∂A programs and ∂W1 programs (one per entry of W1, over its
    member's ∂U columns and all of A) each read ∂U; ∂A's programs loop over W1's rows where they do not fit a tile
    (:func:`_kron_geometry`)."""
    n, ol, im = w1.shape
    _, ok, r = a.shape
    nkb, kw = _kron_geometry(ok, im, r, ol)[2:]
    gw1 = torch.empty(n, ol, im, dtype=w1.dtype, device=w1.device)
    ga = torch.empty(n, ok, r, dtype=a.dtype, device=a.device)
    _kron_bwd_kernel[(nkb + ol * im, n)](w1, a, gu, gw1, ga, ol, im, ok, r, *w1.stride()[1:], *a.stride()[1:],
                                         *gu.stride()[1:], nkb, w1.stride(0), a.stride(0), gu.stride(0),
                                         gw1.stride(0), ga.stride(0), **kw)
    return gw1, ga


def kron_backward_batched(w1: torch.Tensor, a: torch.Tensor, gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂W1, ∂A)`` stacked for the stacked ``∂U (n, ol·ok, im·r)`` (dtypes of W1 and A), reading ∂U once: a
    program per member and split of A's rows (``_kron_bwd_stacked_kernel``), the splits only where the members alone
    give fewer programs than ``per_sm`` per multiprocessor — then ∂W1's fp32 partials summed in split order by a
    second launch. Where fewer than two rows of A fit a tile (a large W1), the two-read launch
    (:func:`_kron_backward_batched_two_reads`, the only form before session 45).

    Measured (H200, bf16, µs a call in a graph, two-read / one-read at 8192-element tiles, run 321) at the shapes of
    SDXL b1 LoKr's four groups (their member counts by inference from the layer counts): 560 members of 1280 × 128
    (A 160 rows) 540.1 / 239.2 — run 317's timeline had that batch at 556 µs, fully exposed —, 90 of 640 × 128 (80
    rows) 47.5 / 23.6, 60 of 10240 × 128 (1280 rows) 168.4 / 217.9, 10 of 5120 × 128 (640 rows) 18.0 / 25.2. The step, SDXL b1 LoKr: one-read everywhere / two-read / one-read 75.63 / 75.89 / 75.58
    ms (run 321); one-read up to 256 rows of A / two-read / the same 76.00 / 76.34 / 76.01 (run 322, floor 58.39).
    At 16384-element tiles (the default since, step not measured) the one-read launch beat the two-read one at all
    four: 108.2, 97.9, 14.1, 15.7 (``_STACKED``)."""
    n, ol, im = w1.shape
    _, ok, r = a.shape
    olp, imp, rp = _p2(ol), _p2(im), _p2(r)
    if 2 * olp * imp * rp > _STACKED["tile"]:
        return _kron_backward_batched_two_reads(w1, a, gu)
    bk = max(2, min(_p2(ok), _STACKED["tile"] // (olp * imp * rp)))
    return stacked_launch(_kron_bwd_stacked_kernel, w1, a, gu, bk, _STACKED["per_sm"], _STACKED["num_warps"],
                          OLP=olp, IMP=imp, RP=rp)


def stacked_launch(kernel, w1, a, gu, bk: int, per_sm: int, num_warps: int, **const):
    """Launch ``kernel`` — :func:`kron_backward_batched`'s, or one with its arguments — over ``(splits, members)``:
    A's rows in blocks of ``bk``, split over programs where the members alone give fewer than ``per_sm`` per
    multiprocessor; ∂W1 written in W1's dtype unsplit, else as fp32 partials ``(n, splits, ol, im)`` summed here in
    split order. Returns ``(∂W1, ∂A)``."""
    n, ol, im = w1.shape
    _, ok, r = a.shape
    want = _cdiv(per_sm * sm_count(w1.device), n)
    splits = max(1, min(want, _cdiv(ok, bk)))
    per = _cdiv(_cdiv(ok, splits), bk) * bk
    splits = _cdiv(ok, per)
    ga = torch.empty(n, ok, r, dtype=a.dtype, device=a.device)
    if splits == 1:
        gw1 = part = torch.empty(n, ol, im, dtype=w1.dtype, device=w1.device)
    else:
        part = torch.empty(n, splits, ol, im, dtype=torch.float32, device=w1.device)
    kernel[(splits, n)](w1, a, gu, part, ga, ol, im, ok, r, per, *w1.stride(), *a.stride(), *gu.stride(),
                        part.stride(0), part.stride(1) if splits > 1 else 0, *ga.stride(), BK=bk, SPLIT=splits > 1,
                        num_warps=num_warps, **const)
    if splits > 1:
        gw1 = part.sum(1).to(w1.dtype)
    return gw1, ga


#: elements of one program's (k, c) tile in :func:`kron_weight_grads`' loop form
_WGRAD_TILE = 2048

#: elements of E one program of :func:`kron_weight_grads`' block form loads at once — ``(BK, M, BC)``, M padded to a
#: power of two — and its warps (``LYCO_KRON_WGRAD_BLOCK``; 0: the loop form everywhere); the fewest programs a
#: launch should have, the budget halved down to ``floor`` until it does (``LYCO_KRON_WGRAD_MIN_PROGRAMS``, 32; 0: the
#: budget as set — :func:`_block_budget`)
_WGRAD_BLOCK = {"elements": graph_policy.env_int("LYCO_KRON_WGRAD_BLOCK", 32768,
                                                 "elements of E a program of LoKr's ∂W′ reductions loads at once"),
                "num_warps": 8,
                "min_programs": graph_policy.env_int("LYCO_KRON_WGRAD_MIN_PROGRAMS", 32,
                                                     "the fewest programs of LoKr's ∂W′ reductions' block form"),
                "floor": 8192}


#: elements of ``G1``/``G2`` per program of :func:`kron_weight_grads`' finishing launch
_FINISH_BLOCK = 1024


def kron_weight_grads(e: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, s: float = 1.0,
                      dtypes: tuple = (torch.float32, torch.float32)) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``E`` ``(L, K, M, C)`` (contiguous: the gradient of a merged weight ``W + s·kron(W1, W2)`` viewed so that
    ``kron(W1, W2)[i,k,j,c] = W1[i,j]·W2[k,c]``), ``W1`` ``(L, M)``, ``W2`` ``(K, C)``: ``(s·Σ_kc E[i,k,j,c]·W2[k,c],
    s·Σ_ij E[i,k,j,c]·W1[i,j])`` in ``dtypes`` — E read once by one launch (programs over (k, c) tiles × W1's rows)
    writing fp32 partials, and both their sums, the scale and the rounding to each factor's dtype by a second
    launch. The caller checks :func:`usable` (any ``inner``: the tiles here do not depend on it).
    Where it replaces two batched matrix-vector products over E in bf16 (``lokr._KronBuild.vjp``; run 148's profile
    of SD1.5's 8×8 3×3 conv, 1280 → 1280: 121 + 43 µs for E's 14.7 M elements). The finishing launch replaced two
    ``sum``s, two casts and (s ≠ 1) two products per layer: run 249's SD1.5 b1 LoKr timeline had 222 fp32 reduces and
    222 bf16 elementwise kernels for its 111 rebuilt layers (by their count these sums and casts: the trace names
    kernels only), 0.68 + 0.25 ms exposed; LoKr's step 30.07 ms there, 29.08 in run 250 with this launch.

    Two forms of the first launch, the same partials: the block form (``_kron_wgrad_block_kernel``: a program loads its
    ``(BK, M, BC)`` block of E at once, :data:`_WGRAD_BLOCK` elements) where M padded times one 128-column row fits
    that budget — at factor 8, every layer —, else the loop form (``_kron_wgrad_kernel``: a (k, c) tile of
    :data:`_WGRAD_TILE` elements, a serial loop over M with two full-tile reductions each). Measured alone (H200, bf16,
    µs a call in a graph with the finish, ``kron_wgrad_tiles.py``, run 334), summed over SDXL b1's linear layers at
    factor 8: loop form at 2048-element tiles 10.37 ms, block form at 16384 elements and 8 warps 7.76 (SD1.5: 1.92,
    1.41); against the loop form at 2048, the block form won on every shape but 1280 → 10240 (37.0 µs against 43.4,
    27.8 at 4096-element loop tiles) — the GEGLU projections that change 177's direct factor gradients take instead.
    Run 335: at 32768 elements and 8 warps 6.55 ms (SD1.5 1.42), the best of ten budget/warp pairs at SDXL; 4 and 16
    warps no better. The step (lokr-full, graph, H200, change 181), block at 16384 / loop / block: SDXL b1 80.27 /
    82.82 / 80.19 ms (run 335), SD1.5 b1 22.98 / 23.77, b8 73.30 / 73.89; at 32768 / 16384 / 32768: SDXL b1 79.75 /
    80.21 / 79.65 (run 336), SDXL b4 212.23 / 214.28 (run 337), SD1.5 b1 23.11 (run 336), b8 73.47 (run 337) — hence
    the default 32768. A third form, one launch without partials (change 182, session 48), lost alone (run 339:
    SDXL 13.69 ms at its best of six tile/warp configurations against 6.63 for the block form, SD1.5 2.13 against 1.41)
    and in the step (SDXL b1 85.26 against 79.17 / 79.21, b4 225.14 against 215.19): it lives on in
    ``benchmarks/experiments/kron_wgrad_tiles.py``."""
    L, K, M, C = e.shape
    mp = _p2(M)
    budget = _WGRAD_BLOCK["elements"]
    if budget and mp * min(128, _p2(C)) <= budget:
        return _kron_wgrad_launch(_kron_wgrad_block_kernel, e, w1, w2, s, dtypes, _block_budget(L, K, M, C) // mp,
                                  MP=mp, num_warps=_WGRAD_BLOCK["num_warps"])
    return _kron_wgrad_launch(_kron_wgrad_kernel, e, w1, w2, s, dtypes, _WGRAD_TILE)


def _block_budget(L: int, K: int, M: int, C: int) -> int:
    """:data:`_WGRAD_BLOCK`'s elements for E ``(L, K, M, C)``, halved while the launch would have fewer than its
    ``min_programs`` and the half still holds one 128-column row of M and is at least its ``floor``.

    Why: alone (run 335, ``kron_wgrad_tiles.py``, µs a call) the block form at
    32768 elements lost to 16384 and 8192 where it left few programs — SD1.5's 320 × 320 layers (8 programs): 11.83
    against 8.26 and 6.42 — and won where it left many (1280 × 1280, 80 programs: 7.04 against 7.94). Halving to at
    least 32 programs (floor 8192) sums, over the linear layers' shapes at their counts, to SD1.5 1.23 ms against
    1.42, SDXL 6.48 against 6.55 (by that table, not run). The step (lokr-full, graph, H200), at 32 programs against
    none: SD1.5 b1 22.79 against 22.98 (run 339), 22.96 against 23.14 / 23.17 (run 342); SD1.5 b8 73.95 against
    73.84, SDXL b1 79.72 against 79.79 (run 342: ties) — hence 32 by default (change 183, session 49)."""
    budget, mp = _WGRAD_BLOCK["elements"], _p2(M)
    least = max(_WGRAD_BLOCK["floor"], mp * min(128, _p2(C)))
    while budget // 2 >= least and L * _wgrad_tiles(K, C, budget // mp)[3] < _WGRAD_BLOCK["min_programs"]:
        budget //= 2
    return budget


def _wgrad_tiles(K: int, C: int, tile: int) -> tuple[int, int, int, int]:
    """``(BK, BC, column tiles, tiles)`` of the (k, c) plane in ``tile``-element tiles: :func:`kron_weight_grads`'
    two-launch geometry (BC up to 128 columns, BK the rest of the tile, rounded down to a power of two as Triton's
    blocks must be: a budget from the environment need not be one)."""
    bc = min(128, _p2(C))
    bk = max(1, min(_p2(K), _p2(tile // bc + 1) // 2))
    ncb = _cdiv(C, bc)
    return bk, bc, ncb, _cdiv(K, bk) * ncb


def _kron_wgrad_launch(kernel, e, w1, w2, s, dtypes, tile: int, **meta):
    """:func:`kron_weight_grads`' two launches with ``kernel`` for the first — programs over ``tile``-element (k, c)
    tiles × W1's rows, the partials' shapes and the finish its — ``meta`` passed to it (the experiments' variants,
    ``benchmarks/experiments/kron_wgrad_tiles.py``, launch theirs through this)."""
    L, K, M, C = e.shape
    bk, bc, ncb, tiles = _wgrad_tiles(K, C, tile)
    p1 = torch.empty(tiles, L, M, dtype=torch.float32, device=e.device)
    p2 = torch.empty(L, K, C, dtype=torch.float32, device=e.device)
    kernel[(tiles, L)](e, w1, w2, p1, p2, K, M, C, *w1.stride(), *w2.stride(), ncb, BK=bk, BC=bc, **meta)
    g1 = torch.empty((L, M), dtype=dtypes[0], device=e.device)
    g2 = torch.empty((K, C), dtype=dtypes[1], device=e.device)
    n1, n2 = L * M, K * C
    _kron_wgrad_finish_kernel[(_cdiv(n1, _FINISH_BLOCK) + _cdiv(n2, _FINISH_BLOCK),)](
        p1, p2, g1, g2, tiles, L, n1, n2, float(s), BLOCK=_FINISH_BLOCK)
    return g1, g2


#: elements per program of :func:`kron_merge`. Alone (run 341, H200, ``experiments/kron_merge_tiles.py``, one merge of
#: each of SDXL's linear layers at factor 8 summed): 1024 / 2048 / 4096 elements 3.44 / 3.44 / 3.83 ms — 2.0 TB/s at
#: 1280 × 1280 (3.3 µs), 3.4–3.9 at the GEGLU and ff.out sizes; a tiled form dividing the row and column indices once
#: per row and column instead of per element (change 184, in that experiment) was slower, 3.84–6.53 ms over eight
#: tile/warp configurations, and in the step (SDXL b1 lokr-full 81.56 ms against 79.27 / 79.35)
_MERGE_BLOCK = 2048


def kron_merge_ok(w: torch.Tensor) -> bool:
    """Whether :func:`kron_merge` takes the weight ``w``: contiguous, fewer than 2³¹ elements (the kernel's int32 flat
    index) and :func:`usable`."""
    return w.is_contiguous() and w.numel() < 2 ** 31 and usable(w, 0)


def kron_merge(w: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, s: float) -> torch.Tensor:
    """``W + s·kron(W1, W2)`` for a contiguous W viewed ``(L, K, M, C)`` (as :func:`kron_weight_grads`), ``W1``
    ``(L, M)``, ``W2`` ``(K, C)`` of any float dtype: one pass (W read once, the result written once in W's dtype,
    computed in fp32 from the factors as they are and rounded once). Where it replaces torch's broadcast
    ``addcmul`` of the factors cast to W's dtype (``lokr._KronBuild``; run 149's profile of a 13 M-element linear
    weight at SD1.5's 8×8 level: 48 µs per merge, twice per step — the forward and the backward's rebuild). The
    caller checks :func:`kron_merge_ok`."""
    L, K, M, C = w.shape
    out = torch.empty_like(w)
    n = w.numel()
    _kron_merge_kernel[(_cdiv(n, _MERGE_BLOCK),)](w, w1, w2, out, n, K, M, C, float(s), *w1.stride(), *w2.stride(),
                                                  BLOCK=_MERGE_BLOCK)
    return out


class _KhatriRao(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a1, a2, b1, b2):
        ctx.save_for_backward(a1, a2, b1, b2)
        return _kr_forward(a1, a2, b1, b2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gka, gkb):
        return tuple(_kr_backward(*ctx.saved_tensors, gka, gkb))


class _KronUp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w1, a):
        ctx.save_for_backward(w1, a)
        return _kron_forward(w1, a)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gu):
        return _kron_backward(*ctx.saved_tensors, gu)


def khatri_rao(a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor):
    """``(Ka, Kb)`` of the module doc by the kernels, differentiable; the caller checks :func:`usable` (with
    ``inner = r1·r2`` padded) and that the four factors share a device and dtype."""
    return _KhatriRao.apply(a1, a2, b1, b2)


def kron_up(w1: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``U = kron(W1, A)`` of the module doc by the kernel, differentiable; the caller checks :func:`usable`
    (``inner = in_m·r`` padded) and that both factors share a device and dtype."""
    return _KronUp.apply(w1, a)


def kr_inner(r1: int, r2: int) -> int:
    """The padded tile size :func:`usable` takes for a Khatri–Rao pair of ranks r1, r2."""
    return _p2(r1) * _p2(r2)


def kron_inner(in_m: int, r: int) -> int:
    """The padded tile size :func:`usable` takes for LoKr's up with W1 ``(·, in_m)`` and rank r."""
    return _p2(in_m) * _p2(r)

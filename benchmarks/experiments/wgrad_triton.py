"""(An experiment, not part of lyco: it lost to cuBLAS — 4.7 vs 3.1 ms per SD1.5 b8 step on an H100, run 99,
benchmarks/NOTES.md change 71; ``wgrad_bench.py`` times it.)

One Triton kernel for a low-rank adapter's own gradients on a linear layer: from ``∂y (P, out)``, the forward's
``h = x·Dᵀ (P, r)`` and ``x (P, in)`` it computes ``∂U = s·∂yᵀh`` and ``∂D = s·(∂y·U)ᵀx`` reading ∂y, h and x once
each — ``∂h = ∂y·U`` stays in registers (a row block's ∂h is complete after its loop over ∂y's columns, and is
then used at once for that block's share of ∂D).

Why (issue 7): the bypass op (:mod:`.lowrank`) computes these with three cuBLAS GEMMs — ∂U (K = P, split-K and a
reduction kernel), ∂h (reads ∂y again, writes ∂h), ∂D (reads ∂h and x; split-K) — on its side stream, which GPU
run 97 showed to be the longer of the backward's two branches on most layers (NOTES change 69): the frozen
layer's ∂x waits for it. Here: ∂y read once instead of twice, ∂h never written, one launch instead of three to
five.

How: a 1-D grid of programs, each over a contiguous range of row blocks (``BM`` rows); per row block a loop over
∂y's columns accumulates ∂h (``BM × r``, fp32) and adds ``hᵀ·∂y`` to the program's partial ∂Uᵀ (``r × out``,
fp32, in global memory — L2-resident: r·out·4 bytes per program), then ∂h rounded to the dtype (as the GEMM's
output is) times x's row block adds to the program's partial ∂D (``r × in``). The partials are summed over the
programs by torch afterwards in a fixed order: no atomics, deterministic.

Selected by :func:`usable` (linear layers with both gradients wanted, CUDA bf16/fp16, r ≤ 64, ``LYCO_TRITON``
not ``0``, the policy ``LYCO_FUSED_WGRAD`` — captured steps by default, :mod:`.graph_policy` — and this kernel's
self-test on the device and dtype). CPU tests run it in Triton's interpreter.
"""

from __future__ import annotations

import torch

from lyco.algorithms import graph_policy
from lyco.algorithms.lowrank_triton import _UPCAST, _br, _cdiv, enabled, gate, self_test, triton

if triton is not None:
    import triton.language as tl

#: the tiles: rows per block, ∂y's and x's columns per step; the programs per SM (the grid is at most that many
#: programs per SM, each over whole row blocks)
_CFG = {"BM": 64, "BK": 64, "BN": 64, "num_warps": 4, "num_stages": 3, "per_sm": 2, "programs": None}

#: the largest rank the kernel takes (∂h's ``BM × r`` fp32 tile in registers)
MAX_RANK = 64

#: (device, dtype) → whether the kernel passed its self-test there
_CHECKED: dict = {}


def usable(gy: torch.Tensor, r: int) -> bool:
    """Whether :func:`lowrank_wgrad` takes this layer (module doc)."""
    return (r <= MAX_RANK and graph_policy.wanted("LYCO_FUSED_WGRAD") and enabled(gy)
            and gate(_CHECKED, gy.device, gy.dtype, _self_test))


if triton is not None:

    @triton.jit
    def _wgrad_kernel(GY, H, X, U, GUP, GDP, P, OUT, IN, R, RPP,
                      sgm, sgk, shm, shr, sxm, sxk, suk, sur,
                      BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                      UPCAST: tl.constexpr):
        """Program p: rows [p·RPP, (p+1)·RPP) ∩ [0, P); GUP[p] (R, OUT) and GDP[p] (R, IN) its fp32 partials of
        ∂Uᵀ/s and ∂D/s, written by its first row block, added to by the others."""
        pid = tl.program_id(0)
        rr = tl.arange(0, BR)
        rmask = rr < R
        lo = pid * RPP
        hi = tl.minimum(lo + RPP, P)
        gup = GUP + pid * R * OUT
        gdp = GDP + pid * R * IN
        kk = tl.arange(0, BK)
        nn = tl.arange(0, BN)
        for m0 in range(lo, hi, BM):
            # the partials hold garbage before this program's first row block: read them only after it (a tensor
            # mask, not a scalar condition: Triton 3.9's interpreter refuses int32 masks)
            later = (tl.zeros((BR,), dtype=tl.int32) + m0) > lo
            rows = m0 + tl.arange(0, BM)
            mmask = rows < hi
            h = tl.load(H + rows[:, None] * shm + rr[None, :] * shr, mask=mmask[:, None] & rmask[None, :], other=0.0)
            gh = tl.zeros((BM, BR), dtype=tl.float32)
            for k0 in range(0, OUT, BK):
                cols = k0 + kk
                kmask = cols < OUT
                gy = tl.load(GY + rows[:, None] * sgm + cols[None, :] * sgk, mask=mmask[:, None] & kmask[None, :],
                             other=0.0)
                u = tl.load(U + cols[:, None] * suk + rr[None, :] * sur, mask=kmask[:, None] & rmask[None, :],
                            other=0.0)
                if UPCAST:
                    gh += tl.dot(gy.to(tl.float32), u.to(tl.float32))
                    pu = tl.dot(tl.trans(h.to(tl.float32)), gy.to(tl.float32))
                else:
                    gh += tl.dot(gy, u)
                    pu = tl.dot(tl.trans(h), gy)
                ptr = gup + rr[:, None] * OUT + cols[None, :]
                m2 = rmask[:, None] & kmask[None, :]
                tl.store(ptr, tl.load(ptr, mask=m2 & later[:, None], other=0.0) + pu, mask=m2)
            ghd = gh.to(GY.dtype.element_ty)  # ∂h rounded to the dtype, as the GEMM's output would be
            for n0 in range(0, IN, BN):
                cin = n0 + nn
                nmask = cin < IN
                x = tl.load(X + rows[:, None] * sxm + cin[None, :] * sxk, mask=mmask[:, None] & nmask[None, :],
                            other=0.0)
                if UPCAST:
                    pd = tl.dot(tl.trans(ghd.to(tl.float32)), x.to(tl.float32))
                else:
                    pd = tl.dot(tl.trans(ghd), x)
                ptr = gdp + rr[:, None] * IN + cin[None, :]
                m2 = rmask[:, None] & nmask[None, :]
                tl.store(ptr, tl.load(ptr, mask=m2 & later[:, None], other=0.0) + pd, mask=m2)


#: (P, device, config) → (programs, rows per program)
_GRIDS: dict = {}


def _grid(p: int, device) -> tuple[int, int]:
    c = _CFG
    key = (p, device, c["BM"], c["per_sm"], c["programs"])
    got = _GRIDS.get(key)
    if got is None:
        target = c["programs"]
        if target is None:
            target = (c["per_sm"] * torch.cuda.get_device_properties(device).multi_processor_count
                      if device.type == "cuda" else 4)
        blocks = _cdiv(p, c["BM"])
        rpp = _cdiv(blocks, max(1, min(target, blocks))) * c["BM"]
        got = _GRIDS[key] = (_cdiv(p, rpp), rpp)
    return got


def lowrank_wgrad(gy: torch.Tensor, h: torch.Tensor, x: torch.Tensor, u: torch.Tensor, s: float):
    """``(∂U, ∂D)`` in fp32 — ``∂U = s·∂yᵀh`` ``(out, r)``, ``∂D = s·(∂y·U)ᵀx`` ``(r, in)`` — for 2-D ``gy (P, out)``,
    ``h (P, r)``, ``x (P, in)``, ``u (out, r)``, all of one dtype (module doc)."""
    p, out = gy.shape
    k_in, r = x.shape[1], u.shape[1]
    if p == 0:
        return gy.new_zeros((out, r), dtype=torch.float32), gy.new_zeros((r, k_in), dtype=torch.float32)
    n, rpp = _grid(p, gy.device)
    gup = torch.empty((n, r, out), device=gy.device, dtype=torch.float32)
    gdp = torch.empty((n, r, k_in), device=gy.device, dtype=torch.float32)
    c = _CFG
    _wgrad_kernel[(n,)](
        gy, h, x, u, gup, gdp, p, out, k_in, r, rpp,
        gy.stride(0), gy.stride(1), h.stride(0), h.stride(1), x.stride(0), x.stride(1), u.stride(0), u.stride(1),
        BM=c["BM"], BK=c["BK"], BN=c["BN"], BR=_br(r), UPCAST=_UPCAST,
        num_warps=c["num_warps"], num_stages=c["num_stages"])
    gu = gup[0] if n == 1 else gup.sum(0)
    gd = gdp[0] if n == 1 else gdp.sum(0)
    return gu.t().mul_(s) if s != 1.0 else gu.t(), gd.mul_(s) if s != 1.0 else gd


def _compare(device, dtype) -> str | None:
    """The kernel at ranks 16 and 8 on ragged shapes against the same math in fp32 torch: None, or why not."""
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for p, out, k_in, r in ((300, 200, 136, 16), (77, 64, 40, 8)):
        gy, x = (torch.randn(p, c, generator=g).to(device, dtype) for c in (out, k_in))
        u, d = torch.randn(out, r, generator=g).to(device, dtype), torch.randn(r, k_in, generator=g).to(device, dtype)
        h = (x.float() @ d.float().t()).to(dtype)
        gu, gd = lowrank_wgrad(gy, h, x, u, 0.5)
        ref_u = 0.5 * gy.float().t() @ h.float()
        ref_d = 0.5 * (gy.float() @ u.float()).to(dtype).float().t() @ x.float()
        for a, b in ((gu, ref_u), (gd, ref_d)):
            worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
    return None if worst <= 2e-2 else f"its self-test's relative error is {worst:.2e}"


def _self_test(device, dtype) -> bool:
    return self_test(device, dtype, _compare, "the fused weight-gradient kernel")

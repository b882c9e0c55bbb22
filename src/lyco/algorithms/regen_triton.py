"""A low-rank down's weight gradient from the two tensors its input is the product of, in Triton on CUDA
(:func:`product_grad`):

``∂D = s·∂hᵀ·(a ⊙ b)`` — where the bypass op rebuilds its input ``x = a ⊙ b`` in backward from what the producing mul
keeps anyway (:mod:`.regen`: a GEGLU's operands before ``ff.net.2``), this kernel reads a and b and forms x tile by
tile in registers, so x is never written. Torch's form is two passes more: the mul writes x (read a and b, write x),
the GEMM reads x again — on an SD1.5 b8 step that is ≈ 1.5 GB of traffic for the 16 ``ff.net.2`` layers, what change
117 (benchmarks/NOTES.md) cost in time.

The first launch: programs over row splits × column blocks of x, each a ``(r, BK)`` fp32 partial product over its rows
(``tl.dot`` of ∂hᵀ's tile with x's), stored per row split — no atomics: deterministic, so a captured step replays
bit for bit what its eager warm-up computed. The second sums the partials, scales by s, and adds into the
gradient (the trainer's fp32 ``.grad``, as the op's ``beta = 1`` GEMM does) or writes it in the asked dtype.

Numerics (decision): x's tile is ``(a·b)`` computed in fp32 and rounded to a's dtype with round-to-nearest-even —
what torch's bf16/fp16 mul writes, element for element — so the products are the ones the rebuilt x gives; only
the order of the fp32 sums differs from cuBLAS's (their relative difference is fp32 rounding, ≈ 1e-6).

Selected by :func:`usable`: :func:`.lowrank_triton.enabled`, the three tensors in one dtype, and this module's
self-test passed on the device and dtype (once per process, :func:`.lowrank_triton.gate`). CPU tests run the kernels
in Triton's interpreter against float64 (where a bf16 ``tl.dot`` is wrong: ``UPCAST`` multiplies the rounded tiles in
fp32 there, as :mod:`.lowrank_triton`'s kernels do).
"""

from __future__ import annotations

import torch

from .lowrank_triton import _UPCAST, _cdiv, enabled, gate, self_test, triton

if triton is not None:
    import triton.language as tl

#: rows and columns of x a program of the first launch reads per step of its loop; its warps and pipeline stages
_CFG = {"BN": 64, "BK": 64, "num_warps": 4, "num_stages": 6}
#: programs the first launch aims at (row splits × column blocks): one per SM of an H100. Runs 184–185
#: (``benchmarks/experiments/regen_wgrad_bench.py``, H100): BN × BK 64 × 64 best of 64/128/256 × 32/64/128, 132–264
#: programs best of 132–1056 (more programs, more partials to sum); this one 0.58 ms summed over SD1.5 b8's 16
#: ``ff.net.2`` layers, 2.64 ms over SDXL b4's 70 — against 1.43 and 6.44 for the mul and cuBLAS
_PROGRAMS = 132
#: the largest rank the kernel takes (its accumulator is rank × BK fp32 registers)
MAX_RANK = 64

#: (device, dtype) → whether the kernels passed their self-test there
_CHECKED: dict = {}


def usable(a: torch.Tensor, b: torch.Tensor, r: int) -> bool:
    """Whether :func:`product_grad` runs on these operands at rank r, ∂h in their dtype (module doc)."""
    return (enabled(a) and a.dtype == b.dtype and r <= MAX_RANK
            and gate(_CHECKED, a.device, a.dtype, _self_test))


def product_grad_torch(gh: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
                       dt: torch.dtype = torch.float64) -> torch.Tensor:
    """:func:`product_grad`'s value in torch: x rebuilt as the mul writes it, then ``s·∂hᵀ·x`` in ``dt`` — float64 by
    default, which no TF32 setting touches (a benchmark that allows TF32 made an fp32 reference 2.4e-4 off and the
    self-test turn the kernels off: run 185)."""
    x = torch.mul(a, b)
    return s * gh.to(dt).t() @ x.to(dt)


def product_grad(gh: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, dt: torch.dtype | None = None,
                 into: torch.Tensor | None = None) -> torch.Tensor | None:
    """``s·∂hᵀ·(a ⊙ b)`` for ``gh`` ``(N, r)`` (any strides) and ``a``, ``b`` ``(N, K)`` with unit column stride (a
    GEGLU's ``a`` is a strided half of its projection's output), all three in one dtype: into ``into`` (``(r, K)``,
    contiguous, any float dtype; None returned) where given, else a new ``(r, K)`` tensor in ``dt`` (a's dtype if
    None). The caller checks :func:`usable`."""
    n, r = gh.shape
    k = a.shape[1]
    bn, bk = _CFG["BN"], _CFG["BK"]
    grid_k = _cdiv(k, bk)
    grid_n = max(1, min(_cdiv(n, bn), _PROGRAMS // grid_k))
    rows = _cdiv(_cdiv(n, grid_n), bn) * bn  # rows per program, whole steps of the loop
    grid_n = _cdiv(n, rows)
    part = torch.empty(grid_n, r, k, device=a.device, dtype=torch.float32)
    big = max(a.stride(0), b.stride(0)) * n >= 2 ** 31 or gh.stride(0) * n >= 2 ** 31
    _partial_kernel[(grid_n, grid_k)](
        gh, a, b, part, n, r, k, rows, gh.stride(0), gh.stride(1), a.stride(0), b.stride(0),
        RP=max(16, triton.next_power_of_2(r)), BN=bn, BK=bk, BIG=big, UPCAST=_UPCAST,
        num_warps=_CFG["num_warps"], num_stages=_CFG["num_stages"])
    out = into if into is not None else torch.empty(r, k, device=a.device, dtype=dt or a.dtype)
    _finish_kernel[(_cdiv(r * k, 1024),)](part, out, grid_n, r * k, float(s), ADD=into is not None, BC=1024)
    return None if into is not None else out


def _self_test(device, dtype) -> bool:
    return self_test(device, dtype, _compare, "the regenerated-input weight-gradient Triton kernels")


def _compare(device, dtype) -> str | None:
    """Ragged shapes (partial row and column blocks, several row steps per program, a rank below 16), a strided a
    and ∂h, written and added into fp32: against :func:`product_grad_torch`."""
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for n, k, r, add in ((1000, 200, 16, True), (77, 33, 5, False)):
        a = torch.randn(n, 2 * k, generator=g).to(device, dtype)[:, :k]
        b = torch.randn(n, k, generator=g).to(device, dtype)
        gh = torch.randn(n, r + 3, generator=g).to(device, dtype)[:, 3:]
        ref = product_grad_torch(gh, a, b, 0.7)
        if add:
            base = torch.randn(r, k, generator=g).to(device)
            got = base.clone()
            product_grad(gh, a, b, 0.7, into=got)
            ref = ref + base.double()
        else:
            got = product_grad(gh, a, b, 0.7, torch.float32)
        worst = max(worst, ((got.double() - ref).abs().max() / ref.abs().max()).item())
    return None if worst <= 1e-4 else f"its self-test's relative error is {worst:.2e}"


if triton is not None:

    @triton.jit
    def _partial_kernel(H, A, B, P, N, R, K, ROWS, shn, shr, sa, sb, RP: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, BIG: tl.constexpr, UPCAST: tl.constexpr):
        pn = tl.program_id(0)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        cmask = cols < K
        rr = tl.arange(0, RP)
        rmask = rr < R
        acc = tl.zeros((RP, BK), dtype=tl.float32)
        first = pn * ROWS
        for i in range(0, ROWS, BN):
            rows = first + i + tl.arange(0, BN)
            nmask = rows < N
            if BIG:
                rows = rows.to(tl.int64)
            ht = tl.load(H + rows[None, :] * shn + rr[:, None] * shr, mask=rmask[:, None] & nmask[None, :],
                         other=0.0)
            m = nmask[:, None] & cmask[None, :]
            av = tl.load(A + rows[:, None] * sa + cols[None, :], mask=m, other=0.0)
            bv = tl.load(B + rows[:, None] * sb + cols[None, :], mask=m, other=0.0)
            x = (av.to(tl.float32) * bv.to(tl.float32)).to(av.dtype)  # the mul's own rounding (module doc)
            if UPCAST:
                acc = tl.dot(ht.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(ht, x, acc)
        tl.store(P + pn * R * K + rr[:, None] * K + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _finish_kernel(P, OUT, GN, RK, s, ADD: tl.constexpr, BC: tl.constexpr):
        idx = tl.program_id(0) * BC + tl.arange(0, BC)
        m = idx < RK
        acc = tl.zeros((BC,), dtype=tl.float32)
        for i in range(0, GN):
            acc += tl.load(P + i * RK + idx, mask=m, other=0.0)
        acc = s * acc
        if ADD:
            acc += tl.load(OUT + idx, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + idx, acc.to(OUT.dtype.element_ty), mask=m)

"""Diag-OFT's block Gram from a layer's output, in one Triton launch on CUDA (:func:`block_gram`):

``G_k = Σ_t ∂y_kᵀ·(y_k − b_k)`` for every block k of b output channels (``∂y_k``, ``y_k``: the rows' columns
``k·b … k·b + b − 1``) — what :class:`.oft._RotateKeepOutput` needs for a layer's rotation gradient where the rebuilt op
runs the weight-gradient GEMM ``∂W′ = ∂yᵀ·x`` (the layer's forward multiply-adds again) and a weight-sized batched
GEMM after it.

The launch: programs over row chunks × column tiles of BC channels (BC/b blocks); each multiplies its tile's
``∂yᵀ·y`` (BC × BC, tensor-core dots of the stored bf16/fp16 values, fp32 accumulators) over its rows and keeps only
the b × b blocks on the diagonal (the tile's other products are BC/b − 1 times the work and never stored: the pass is
bound by reading ∂y and y); the bias enters as ``− (Σ_t ∂y_k)·b_kᵀ`` from the column sums the same loop forms (fp32;
y is never rounded again after subtracting it). Partial sums per row chunk, then one sum (no atomics: deterministic,
so a captured step is bit-identical to an eager one).

Selected by :func:`usable`: :func:`.lowrank_triton.enabled` (Triton, CUDA bf16/fp16, ``LYCO_TRITON`` not ``0``, not
under ``torch.compile``), a block size the tile holds (:func:`supports`) and this module's self-test passed on the device
and dtype (once per process, :func:`.lowrank_triton.gate`). :func:`block_gram_torch` is the same math in torch (the CPU;
the tests' reference is float64). CPU tests run the kernel in Triton's interpreter, whose bf16 ``tl.dot`` is wrong
(``_UPCAST``: fp32 dots there).
"""

from __future__ import annotations

import torch

from .lowrank_triton import _UPCAST, _cdiv, enabled, gate, self_test, triton

if triton is not None:
    import triton.language as tl

#: rows a program reads per step of its loop, the column tile (at least the block size), warps, and the programs a
#: launch aims at (row chunks × column tiles); not swept
_CFG = dict(BM=128, BC=64, num_warps=4, programs=528)

#: (device, dtype) → whether the kernel passed its self-test there
_CHECKED: dict = {}


def supports(b: int) -> bool:
    """Block sizes the kernel takes: a power of two from 16 (a tensor-core dot's smallest side) to 64 (a 64 × 64 fp32 tile of
    accumulators per program)."""
    return 16 <= b <= 64 and b & (b - 1) == 0


def usable(t: torch.Tensor, b: int) -> bool:
    """Whether :func:`block_gram` runs on ``t``'s device and dtype for blocks of ``b`` (module doc)."""
    return supports(b) and enabled(t) and gate(_CHECKED, t.device, t.dtype, _self_test)


def block_gram_torch(gy2: torch.Tensor, y2: torch.Tensor, bias: torch.Tensor | None, b: int) -> torch.Tensor:
    """:func:`block_gram` in torch: ``(C/b, b, b)`` in fp32 (float64 for float64 inputs)."""
    dt = torch.promote_types(y2.dtype, torch.float32)
    n, c = y2.shape
    v = y2.to(dt) if bias is None else y2.to(dt) - bias.to(dt)
    g3 = gy2.to(dt).reshape(n, c // b, b).transpose(0, 1)   # (k, T, i)
    v3 = v.reshape(n, c // b, b).transpose(0, 1)             # (k, T, j)
    return torch.bmm(g3.transpose(1, 2), v3)


def block_gram(gy2: torch.Tensor, y2: torch.Tensor, bias: torch.Tensor | None, b: int) -> torch.Tensor:
    """``G[k, i, j] = Σ_t ∂y[t, k·b + i]·(y[t, k·b + j] − bias[k·b + j])`` for 2-D ``∂y`` and ``y`` ``(T, C)`` with unit
    column stride, ``bias`` ``(C,)`` or None: ``(C/b, b, b)`` in fp32. The caller checks :func:`usable`."""
    n, c = y2.shape
    bm, bc, warps, programs = (_CFG[k] for k in ("BM", "BC", "num_warps", "programs"))
    bc = max(bc, b)
    grid_c = _cdiv(c, bc)
    grid_m = max(1, min(_cdiv(n, bm), programs // grid_c))
    rows = _cdiv(_cdiv(n, grid_m), bm) * bm  # rows per program, whole steps of the loop
    grid_m = _cdiv(n, rows)
    part = torch.empty(grid_m, c, b, device=y2.device, dtype=torch.float32)
    _gram_kernel[(grid_m, grid_c)](gy2, y2, bias if bias is not None else y2, part, n, c, rows, gy2.stride(0),
                                   y2.stride(0), HAS_BIAS=bias is not None, B=b, BM=bm, BC=bc, UPCAST=_UPCAST,
                                   num_warps=warps)
    g = part[0] if grid_m == 1 else part.sum(0)
    return g.view(c // b, b, b)


def _self_test(device, dtype) -> bool:
    return self_test(device, dtype, _compare, "the Diag-OFT block-Gram Triton kernel")


def _compare(device, dtype) -> str | None:
    """Ragged rows (a partial last step, several steps per program), a partial column tile, with and without a bias, a
    strided ∂y, blocks of 16 and 32: against :func:`block_gram_torch`."""
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for n, c, b, bias in ((1000, 320, 16, True), (77, 96, 32, False), (300, 80, 16, False)):
        gy = torch.randn(n, c + 8, generator=g).to(device, dtype)[:, 8:]
        y = torch.randn(n, c, generator=g).to(device, dtype)
        bv = torch.randn(c, generator=g).to(device, dtype) if bias else None
        got = block_gram(gy, y, bv, b)
        ref = block_gram_torch(gy, y, bv, b)
        worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    if worst > 1e-3:
        return f"its self-test's relative error is {worst:.2e}"
    return None


if triton is not None:

    @triton.jit
    def _gram_kernel(G, Y, BIAS, P, N, C, ROWS, sg, sy, HAS_BIAS: tl.constexpr, B: tl.constexpr, BM: tl.constexpr,
                     BC: tl.constexpr, UPCAST: tl.constexpr):
        pm = tl.program_id(0)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        cmask = cols < C
        acc = tl.zeros((BC, BC), dtype=tl.float32)
        csum = tl.zeros((BC,), dtype=tl.float32)
        first = pm * ROWS
        for i in range(0, ROWS, BM):
            rows = first + i + tl.arange(0, BM)
            m = (rows < N)[:, None] & cmask[None, :]
            gv = tl.load(G + rows[:, None] * sg + cols[None, :], mask=m, other=0.0)
            yv = tl.load(Y + rows[:, None] * sy + cols[None, :], mask=m, other=0.0)
            if UPCAST:
                acc += tl.dot(tl.trans(gv.to(tl.float32)), yv.to(tl.float32))
            else:
                acc += tl.dot(tl.trans(gv), yv)
            if HAS_BIAS:
                csum += tl.sum(gv.to(tl.float32), axis=0)
        if HAS_BIAS:
            bv = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
            acc -= csum[:, None] * bv[None, :]
        ii = tl.arange(0, BC)
        keep = ((ii[:, None] // B) == (ii[None, :] // B)) & cmask[:, None]
        tl.store(P + pm * C * B + cols[:, None] * B + (ii % B)[None, :], acc, mask=keep)

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

Two more launches replace the torch chains around it (:func:`kernels_usable`; ``LYCO_OFT_KERNELS``, captured steps by
default): :func:`rotate_rows` builds ``W′_k = W_k + A′_k·W_k`` with ``A′ = 2m·(M − I)ᵀ`` formed from the Cayley inverse
M in the same launch — W read once and W′ written once, where torch forms A′ (two kernels), copies W into the output
and runs cuBLAS's batched GEMM over it (run 164's timeline of an SDXL b4 Diag-OFT step: 1444 copies, 7.97 ms, and
1444 batched GEMMs with K = b, 22.8 ms); :func:`cayley_grad` takes a layer's block Gram (or ``∂A′``) to ``∂blocks``
through the Cayley backward (``∂Q = 2m·Mᵀ·∂R·Mᵀ``, ``∂B = ∂Q − ∂Qᵀ``) — one program per block, fp32 ``"ieee"`` dots
of b × b tiles — where torch launches several small kernels per layer (run 164: six kinds, 717–723 launches each,
12.4 ms summed with A′'s). H100, SDXL b4 Diag-OFT with the output-keeping op: 237.81 ms per step without these two
(run 216), 195.28 with them (run 218).

Selected by :func:`usable`: :func:`.lowrank_triton.enabled` (Triton, CUDA bf16/fp16, ``LYCO_TRITON`` not ``0``, not
under ``torch.compile``), a block size the tile holds (:func:`supports`) and this module's self-test passed on the device
and dtype (once per process, :func:`.lowrank_triton.gate`). :func:`block_gram_torch` is the same math in torch (the CPU;
the tests' reference is float64). CPU tests run the kernel in Triton's interpreter, whose bf16 ``tl.dot`` is wrong
(``_UPCAST``: fp32 dots there).
"""

from __future__ import annotations

import torch

from . import graph_policy
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


def usable(t: torch.Tensor, b: int, dtype: torch.dtype | None = None) -> bool:
    """Whether :func:`block_gram` runs on ``t``'s device and dtype (or ``dtype``: what an op on t computes in, its
    output's — autocast's for an fp32 input) for blocks of ``b`` (module doc)."""
    dt = dtype or t.dtype
    return supports(b) and enabled(t, dt) and gate(_CHECKED, t.device, dt, _self_test)


def block_gram_torch(gy2: torch.Tensor, y2: torch.Tensor, bias: torch.Tensor | None, b: int) -> torch.Tensor:
    """:func:`block_gram` in torch: ``(C/b, b, b)`` in fp32 (float64 for float64 inputs)."""
    dt = torch.promote_types(y2.dtype, torch.float32)
    n, c = y2.shape
    v = y2.to(dt) if bias is None else y2.to(dt) - bias.to(dt)
    g3 = gy2.to(dt).reshape(n, c // b, b).transpose(0, 1)   # (k, T, i)
    v3 = v.reshape(n, c // b, b).transpose(0, 1)             # (k, T, j)
    return torch.bmm(g3.transpose(1, 2), v3)


def block_gram(gy2: torch.Tensor, y2: torch.Tensor, bias: torch.Tensor | None, b: int,
               parts: bool = False) -> torch.Tensor:
    """``G[k, i, j] = Σ_t ∂y[t, k·b + i]·(y[t, k·b + j] − bias[k·b + j])`` for 2-D ``∂y`` and ``y`` ``(T, C)`` with unit
    column stride, ``bias`` ``(C,)`` or None: ``(C/b, b, b)`` in fp32 — or with ``parts`` the per-chunk partial sums
    ``(P, C/b, b, b)`` (for :func:`cayley_grad`, which sums them). The caller checks :func:`usable`."""
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
    if parts:
        return part.view(grid_m, c // b, b, b)
    g = part[0] if grid_m == 1 else part.sum(0)
    return g.view(c // b, b, b)


#: :func:`rotate_rows`'s columns per program and warps (not swept)
_ROWS_CFG = dict(BK=128, num_warps=4)


def kernels_usable(w: torch.Tensor, minv: torch.Tensor) -> bool:
    """Whether :func:`rotate_rows` and :func:`cayley_grad` run for weight ``w`` and Cayley inverse ``minv``
    ``(nb, b, b)``: ``LYCO_OFT_KERNELS`` (:mod:`.graph_policy`, captured steps by default — a Triton launch binds its
    arguments in Python), the kernels usable on W's device and dtype (:func:`usable`, block size included), W
    contiguous with ``nb·b`` rows, M fp32 (any strides: ``inv_ex`` returns it column-major)."""
    if not graph_policy.wanted("LYCO_OFT_KERNELS"):
        return False
    b = minv.shape[-1]
    return (minv.dtype == torch.float32 and w.is_contiguous()
            and w.shape[0] == minv.shape[0] * b and minv.device == w.device and usable(w, b))


def rotate_rows_torch(w: torch.Tensor, minv: torch.Tensor, s2: float) -> torch.Tensor:
    """``W′_k = W_k + A′_k·W_k`` with ``A′ = s2·(M − I)ᵀ`` rounded to W's dtype first (as :class:`.oft._DiagOFTBuild`),
    over W's rows in blocks of b (W of any shape, its first axis the outputs): the reference :func:`rotate_rows`
    follows."""
    nb, b = minv.shape[0], minv.shape[-1]
    eye = torch.eye(b, dtype=minv.dtype, device=minv.device)
    a = ((minv - eye).transpose(1, 2) * s2).to(w.dtype)
    wb = w.reshape(nb, b, -1)
    return (wb.to(torch.promote_types(w.dtype, torch.float32))
            + torch.bmm(a, wb).to(torch.promote_types(w.dtype, torch.float32))).to(w.dtype).reshape(w.shape)


def rotate_rows(w: torch.Tensor, minv: torch.Tensor, s2: float) -> torch.Tensor:
    """:func:`rotate_rows_torch` in one launch: programs over (block, column tile), A′ formed from M in registers and
    rounded to W's dtype, ``W + A′·W`` accumulated in fp32 and rounded once. The caller checks
    :func:`kernels_usable`."""
    nb, b = minv.shape[0], minv.shape[-1]
    out = torch.empty_like(w)
    k = w.numel() // w.shape[0]
    bk, warps = _ROWS_CFG["BK"], _ROWS_CFG["num_warps"]
    _rotate_kernel[(nb, _cdiv(k, bk))](w, minv, out, k, float(s2), *minv.stride(), B=b, BK=bk, UPCAST=_UPCAST,
                                       num_warps=warps)
    return out


def cayley_grad_torch(part: torch.Tensor, minv: torch.Tensor, s2: float, dtype: torch.dtype,
                      gram: bool) -> torch.Tensor:
    """:func:`cayley_grad` in torch (the math of :meth:`.oft._CayleyBuild._blocks_grad`, unconstrained)."""
    nb, b = minv.shape[0], minv.shape[-1]
    g = part.reshape(-1, nb, b, b).to(minv.dtype).sum(0)
    mt = minv.transpose(1, 2)
    eye = torch.eye(b, dtype=minv.dtype, device=minv.device)
    ga = g @ (2.0 * mt - eye) if gram else g
    gq = s2 * (mt @ ga.transpose(1, 2) @ mt)
    return (gq - gq.transpose(1, 2)).to(dtype)


def cayley_grad(part: torch.Tensor, minv: torch.Tensor, s2: float, dtype: torch.dtype, gram: bool) -> torch.Tensor:
    """``∂blocks`` of unconstrained Diag-OFT blocks, ``(nb, b, b)`` in ``dtype``, from fp32 ``part`` ``(P, nb, b, b)``
    (any leading count P of partial sums) and the Cayley inverse M: with ``gram`` the sums are the block Gram G
    (:func:`block_gram`'s partials) and ``∂A′ = G·Rᵀ`` (``Rᵀ = 2Mᵀ − I``: the output-keeping op's recovery), else they
    are ``∂A′`` itself (the rebuilt op's ``E_k·W_kᵀ``); then ``∂Q = s2·Mᵀ·∂A′ᵀ·Mᵀ`` (s2 = 2m) and ``∂B = ∂Q − ∂Qᵀ``. One
    program per block, fp32 dots in IEEE precision. The caller checks :func:`kernels_usable`."""
    nb, b = minv.shape[0], minv.shape[-1]
    part = part.reshape(-1, nb, b, b)
    if not part.is_contiguous():
        part = part.contiguous()
    out = torch.empty(nb, b, b, device=minv.device, dtype=dtype)
    _cayley_kernel[(nb,)](part, part.shape[0], minv, out, nb, float(s2), *minv.stride(), GRAM=gram, B=b,
                          num_warps=4)
    return out


def _self_test(device, dtype) -> bool:
    return self_test(device, dtype, _compare, "the Diag-OFT block-Gram Triton kernel")


def _compare(device, dtype) -> str | None:
    """Ragged rows (a partial last step, several steps per program), a partial column tile, with and without a bias, a
    strided ∂y, blocks of 16 and 32: against :func:`block_gram_torch` in float64; then the rows' rotation (against its
    torch form in the weight's dtype) and the Cayley backward (float64)."""
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for n, c, b, bias in ((1000, 320, 16, True), (77, 96, 32, False), (300, 80, 16, False)):
        gy = torch.randn(n, c + 8, generator=g).to(device, dtype)[:, 8:]
        y = torch.randn(n, c, generator=g).to(device, dtype)
        bv = torch.randn(c, generator=g).to(device, dtype) if bias else None
        got = block_gram(gy, y, bv, b)
        ref = block_gram_torch(gy.double(), y.double(), None if bv is None else bv.double(), b)
        worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    if worst > 1e-3:
        return f"its self-test's relative error is {worst:.2e}"
    # the rows' rotation (a conv-shaped W, a ragged last column tile) and the Cayley backward (both inputs)
    for shape, b in (((64, 40, 3, 3), 16), ((96, 200), 32)):
        nb = shape[0] // b
        q = 0.1 * torch.randn(nb, b, b, generator=g)
        minv = torch.linalg.inv(torch.eye(b) - (q - q.transpose(1, 2))).to(device)
        w = torch.randn(shape, generator=g).to(device, dtype)
        got, ref = rotate_rows(w, minv, 1.4).float(), rotate_rows_torch(w, minv, 1.4).float()
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        if err > 1e-2:
            return f"its row rotation's relative error is {err:.2e}"
        part = torch.randn(3, nb, b, b, generator=g).to(device)
        for gram in (True, False):
            # the reference in float64: a caller may have allowed TF32 for fp32 matmuls (the benchmark does; run 217's
            # self-test failed on that reference's 6e-4, not on the kernel)
            got = cayley_grad(part, minv, 1.4, torch.float32, gram)
            ref = cayley_grad_torch(part.double(), minv.double(), 1.4, torch.float64, gram)
            err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
            if err > 1e-4:
                return f"its Cayley backward's relative error is {err:.2e}"
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

    @triton.jit
    def _rotate_kernel(W, MINV, OUT, K, s2, sm0, sm1, sm2, B: tl.constexpr, BK: tl.constexpr,
                       UPCAST: tl.constexpr):
        kb = tl.program_id(0)
        r = tl.arange(0, B)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        cmask = cols < K
        # A′[i, j] = s2·(M[j, i] − δ_ij), rounded to W's dtype as the torch build rounds it
        mt = tl.load(MINV + kb * sm0 + r[None, :] * sm1 + r[:, None] * sm2)
        a = s2 * (mt - (r[:, None] == r[None, :]).to(tl.float32))
        wp = W + (kb * B + r)[:, None] * K + cols[None, :]
        wv = tl.load(wp, mask=cmask[None, :], other=0.0)
        a16 = a.to(OUT.dtype.element_ty)
        if UPCAST:
            acc = tl.dot(a16.to(tl.float32), wv.to(tl.float32))
        else:
            acc = tl.dot(a16, wv)
        out = wv.to(tl.float32) + acc
        tl.store(OUT + (kb * B + r)[:, None] * K + cols[None, :], out.to(OUT.dtype.element_ty), mask=cmask[None, :])

    @triton.jit
    def _cayley_kernel(P, NP, MINV, OUT, NB, s2, sm0, sm1, sm2, GRAM: tl.constexpr, B: tl.constexpr):
        kb = tl.program_id(0)
        r = tl.arange(0, B)
        off = kb * B * B + r[:, None] * B + r[None, :]
        g = tl.zeros((B, B), dtype=tl.float32)
        for p in range(0, NP):
            g += tl.load(P + p * NB * B * B + off)
        mt = tl.load(MINV + kb * sm0 + r[None, :] * sm1 + r[:, None] * sm2)   # Mᵀ
        if GRAM:
            rt = 2.0 * mt - (r[:, None] == r[None, :]).to(tl.float32)   # Rᵀ = 2Mᵀ − I
            ga = tl.dot(g, rt, input_precision="ieee")
        else:
            ga = g
        t = tl.dot(mt, tl.trans(ga), input_precision="ieee")
        gq = s2 * tl.dot(t, mt, input_precision="ieee")
        tl.store(OUT + off, (gq - tl.trans(gq)).to(OUT.dtype.element_ty))

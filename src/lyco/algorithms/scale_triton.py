"""(IA)³'s per-channel gradient from a layer's output, in two Triton launches on CUDA (:func:`channel_grad`):

``∂w[c] = s·Σ_n ∂y[n,c]·(y[n,c] − b[c]) / d[c]`` with ``d = 1 + s·w`` — the gradient of an output-mode (IA)³ vector
``w`` (``y = (1 + s·w) ⊙ (x·Wᵀ) + b``) recovered from the layer's output ``y`` instead of a weight-gradient GEMM (see
:class:`.ia3._KeepOutput` for where and why). The first launch reads ∂y and y once (programs over row blocks ×
column blocks, fp32 partial sums per row block: no atomics, deterministic); the second sums the partials, divides and
writes ∂w in w's dtype. Torch would take a multiply, a subtraction and a reduction over activation-sized temporaries
(four passes or more) and three small kernels after them.

Numerics: products and sums in fp32 from the stored bf16/fp16 values; ``d`` in fp32 from ``w`` as stored. ``|d|`` is
held at ``2⁻⁶`` or more (its sign kept; :data:`MIN_SCALE`) — the caller's doc says what that means.

Selected by :func:`usable`: :func:`.lowrank_triton.enabled` (Triton, CUDA bf16/fp16, ``LYCO_TRITON`` not ``0``, not
under ``torch.compile``) and this module's self-test passed on the device and dtype (once per process,
:func:`.lowrank_triton.gate`). :func:`channel_grad_torch` is the same math in torch (the CPU; the tests' reference is
float64 written out in the tests). CPU tests run the kernels in Triton's interpreter.
"""

from __future__ import annotations

import torch

from . import graph_policy
from .lowrank_triton import _cdiv, enabled, gate, self_test, triton

if triton is not None:
    import triton.language as tl

#: the smallest ``|1 + s·w|`` the division uses (module doc)
MIN_SCALE = 2.0 ** -6
#: the first launch's setting: rows and columns a program reads per step of its loop, warps, and the programs it aims
#: at (row blocks × column blocks: a few per SM of an H100); ``benchmarks/experiments/ia3_kernel_bench.py`` sweeps it
#: run 206 (24 settings at SD1.5 b8's and SDXL b4's shapes): 128 × 64, 8 warps, 264 programs best; run 207 (36 around
#: it): 256 × 64, 8 warps, 528 — over the 512-input line 1.66 ms per SD1.5 b8 step and 11.69 per SDXL b4 step, against
#: 1.95 and 15.71 for run 206's best (graph replays of one layer's inputs: partly from L2, so the step's share is less)
_CG_CFG = dict(BM=256, BC=64, num_warps=8, programs=528)
#: elements per program of :func:`scale_rows`, and its warps (the same benchmark sweeps them)
_BUILD_CFG = dict(BLOCK=4096, num_warps=8)

#: (device, dtype) → whether the kernels passed their self-test there
_CHECKED: dict = {}


def usable(t: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether :func:`channel_grad` runs on ``t``'s device and dtype (or ``dtype``: what an op on t computes in, its
    output's — autocast's for an fp32 input; module doc)."""
    dt = dtype or t.dtype
    return enabled(t, dt) and gate(_CHECKED, t.device, dt, _self_test)


def _scale(w: torch.Tensor, s: float, dt: torch.dtype) -> torch.Tensor:
    d = 1.0 + s * w.to(dt)
    return torch.where(d.abs() < MIN_SCALE, torch.where(d < 0, -MIN_SCALE, MIN_SCALE), d)


def channel_grad_torch(gy2: torch.Tensor, y2: torch.Tensor, bias: torch.Tensor | None, w: torch.Tensor,
                       s: float) -> torch.Tensor:
    """:func:`channel_grad` in torch (fp32 math, or float64 for float64 tensors)."""
    dt = torch.promote_types(y2.dtype, torch.float32)
    v = y2.to(dt) if bias is None else y2.to(dt) - bias.to(dt)
    return channel_finish_torch((gy2.to(dt) * v).sum(0, keepdim=True), w, s)


def channel_grad(gy2: torch.Tensor, y2: torch.Tensor, bias: torch.Tensor | None, w,
                 s: float, weight=None, scaled: bool = False):
    """``s·Σ_n ∂y[n,c]·(y[n,c] − b[c]) / d[c]``, ``d = 1 + s·w`` held at ``|d| ≥`` :data:`MIN_SCALE`, for 2-D ``∂y``
    and ``y`` ``(N, C)`` with unit column stride, ``b`` ``(C,)`` or None, ``w`` of C elements (any shape, any float
    dtype) — or a tuple of up to :data:`MEMBERS` such vectors whose entries together are the C columns (several
    layers' outputs side by side: :class:`.ia3._SharedKeepOutput`) — the result in w's shape and dtype (a tuple of
    them). ``weight``: :func:`channel_finish`'s (``(∂w, W′)`` returned). ``scaled`` (one vector, no weight): the first
    launch also writes ``∂y ⊙ (1 + s·w)`` (unclamped: the forward's scale) in ∂y's dtype, contiguous — ``(∂w, that)``
    returned: the ∂x GEMM's left side on the frozen W where W′ is not built (:func:`scale_cols`'s forward). The
    caller checks :func:`usable`."""
    n, c = y2.shape
    bm, bc, warps, programs = (_CG_CFG[k] for k in ("BM", "BC", "num_warps", "programs"))
    grid_c = _cdiv(c, bc)
    grid_m = max(1, min(_cdiv(n, bm), programs // grid_c))
    rows = _cdiv(_cdiv(n, grid_m), bm) * bm  # rows per program, whole steps of the loop
    grid_m = _cdiv(n, rows)
    part = torch.empty(grid_m, c, device=y2.device, dtype=torch.float32)
    gs = torch.empty((n, c), device=gy2.device, dtype=gy2.dtype) if scaled else part
    if scaled and (weight is not None or isinstance(w, (tuple, list))):
        raise ValueError("lyco: (IA)³ channel gradient: the scaled ∂y is for one layer without its weight")
    _partial_kernel[(grid_m, grid_c)](gy2, y2, bias if bias is not None else y2, part, n, c, rows,
                                      gy2.stride(0), y2.stride(0), w.reshape(-1) if scaled else part, gs, float(s),
                                      HAS_BIAS=bias is not None, SCALED=scaled, BM=bm, BC=bc, num_warps=warps)
    gw = channel_finish(part, w, s, weight)
    return (gw, gs) if scaled else gw


def channel_finish(part: torch.Tensor, w, s: float, weight=None):
    """:func:`channel_grad`'s second launch alone: ``s·Σ_i part[i, c] / d[c]`` (``d = 1 + s·w`` held as there) from
    fp32 partial sums ``(programs, C)`` another kernel formed (:class:`ChannelLink`'s), in w's shape and dtype (``w``
    a tuple of members' vectors: a tuple of results, views of one buffer). With ``weight`` (W, contiguous, one row per
    entry of w; a tuple of them with a tuple w): also :func:`scale_rows`'s ``W′`` for the same s by the same launch
    (the members' rows one below the other, :func:`scale_rows_multi`'s) — ``(∂w, W′)`` returned (change 122: one launch
    per layer fewer in backward, where W′ is built again for the ∂x GEMM). The caller checks :func:`usable`
    (:func:`channel_finish_torch` otherwise)."""
    many = isinstance(w, (tuple, list))
    ws = tuple(w) if many else (w,)
    c = part.shape[1]
    cs = [v.numel() for v in ws]
    if len(ws) > MEMBERS or sum(cs) != c:
        raise ValueError(f"lyco: (IA)³ channel gradient: {len(ws)} vectors of {cs} entries for {c} columns "
                         f"(at most {MEMBERS} vectors whose entries add up to the columns)")
    out = torch.empty(c, device=part.device, dtype=ws[0].dtype)
    wf = _slots([v.reshape(-1) for v in ws])
    nfin = _cdiv(c, 256)
    res = out.split(cs)
    res = tuple(r.view(v.shape) for r, v in zip(res, ws)) if many else res[0].view(w.shape)
    bounds = (cs[0], cs[0] + (cs[1] if len(cs) > 1 else 0))
    if weight is None:
        _finish_kernel[(nfin,)](part, *wf, *bounds, out, part.shape[0], c, float(s), MIN_SCALE, BC=256)
        return res
    mats = tuple(weight) if many else (weight,)
    w2, wsl, ns, blocks = _rows_out(mats)
    blk, warps = _BUILD_CFG["BLOCK"], _BUILD_CFG["num_warps"]
    _finish_rows_kernel[(nfin + blocks,)](
        part, *wf, *bounds, out, part.shape[0], c, float(s), MIN_SCALE, *wsl, w2, *ns, w2[0].numel(), nfin,
        HAS_S=s != 1.0, BC=256, BLOCK=blk, num_warps=warps)
    return res, w2


def col_scale_torch(w: torch.Tensor, s: float, dtype: torch.dtype) -> torch.Tensor:
    """``1 + s·w`` per column in fp32 (float64 for a float64 ``dtype``), unclamped: the output-scale form's factor."""
    dt = torch.promote_types(dtype, torch.float32)
    return 1.0 + s * w.reshape(-1).to(dt)


def scale_cols_torch(z: torch.Tensor, w: torch.Tensor, s: float, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`scale_cols` in torch (fp32 math, one rounding; float64 for float64 tensors), a new tensor."""
    d = col_scale_torch(w, s, z.dtype)
    y = z.to(d.dtype) * d
    if bias is not None:
        y = y + bias.to(d.dtype)
    return y.to(z.dtype)


def cols_usable(z: torch.Tensor) -> bool:
    """Whether :func:`scale_cols` runs on ``z`` (2-D, unit column stride, the kernels usable on its device and
    dtype)."""
    return z.dim() == 2 and z.stride(1) == 1 and usable(z)


def scale_cols(z: torch.Tensor, w: torch.Tensor, s: float, bias: torch.Tensor | None) -> torch.Tensor:
    """``y = z ⊙ (1 + s·w) + b`` per column of 2-D ``z`` ``(N, C)``, written over z (returned) in one Triton launch:
    an output-mode (IA)³ layer's forward as the frozen GEMM without its bias and this pass (:class:`.ia3._KeepOutput`
    where the output is smaller than the weight) instead of building ``W′`` — fp32 math from the stored values, one
    rounding. The caller checks :func:`cols_usable`."""
    n, c = z.shape
    bm, bc, warps = (_COLS_CFG[k] for k in ("BM", "BC", "num_warps"))
    _cols_kernel[(_cdiv(n, bm), _cdiv(c, bc))](z, w.reshape(-1), bias if bias is not None else z, n, c, z.stride(0),
                                               float(s), HAS_BIAS=bias is not None, BM=bm, BC=bc, num_warps=warps)
    return z


#: :func:`scale_cols`'s tile (rows × columns per program) and warps (not swept)
_COLS_CFG = dict(BM=32, BC=128, num_warps=4)


def channel_finish_torch(part: torch.Tensor, w: torch.Tensor, s: float) -> torch.Tensor:
    """:func:`channel_finish` in torch (fp32 math, or float64 for float64 sums) — also the last step of the torch
    forms of :func:`channel_grad` and :func:`channel_grad_bcl`."""
    dt = torch.promote_types(part.dtype, torch.float32)
    return (s * part.to(dt).sum(0) / _scale(w.reshape(-1), s, dt)).to(w.dtype).reshape(w.shape)


class ChannelLink:
    """Between an output-mode (IA)³ layer that keeps its output p (:class:`.ia3._KeepOutput`) and the op that reads p
    as a GEGLU's projection output (the next ``ff.net.2``): that op's backward runs the GEGLU's backward in one kernel
    (:func:`.regen_triton.geglu_backward`), which then also forms the column sums ``Σ_n ∂p·(p − b)`` the producer's
    ``∂w`` needs and :meth:`offer` s them with the ∂p it wrote; the producer's backward :meth:`take` s them for the
    gradient autograd hands it — only if that is the same tensor, unchanged (same storage, shape, strides and
    version: another consumer of p, whose gradient autograd adds, makes it a new tensor or bumps the version), else
    nothing and the producer reads ∂p and p itself (:func:`channel_grad`). Change 121: one read of ∂p and p fewer per
    GEGLU projection, the GEGLU kernel's column sums beside its tiles."""

    __slots__ = ("bias", "part", "grad", "version")

    def __init__(self, bias: torch.Tensor | None):
        self.bias = bias
        self.part = self.grad = self.version = None

    def offer(self, part: torch.Tensor, grad: torch.Tensor) -> None:
        self.part, self.grad, self.version = part, grad, grad._version

    def take(self, gy: torch.Tensor) -> torch.Tensor | None:
        """The partial sums offered for exactly ``gy``, or None; the link keeps nothing after."""
        part, grad, version = self.part, self.grad, self.version
        self.part = self.grad = self.version = None
        if part is None:
            return None
        g2 = gy.reshape(-1, gy.shape[-1])
        if (g2.shape != grad.shape or g2.stride() != grad.stride() or g2.data_ptr() != grad.data_ptr()
                or g2.dtype != grad.dtype or gy._version != version):
            return None
        return part


def scale_rows_torch(w: torch.Tensor, wv: torch.Tensor, s: float) -> torch.Tensor:
    """``W′ = W + W ⊙ c`` with ``c = s·w`` per row (one ``addcmul``, the weight rounded once; ``s·w`` rounded to w's
    own dtype, then to W's — never ``1 + s·w`` in a 16-bit dtype): the reference :func:`scale_rows` matches."""
    sw = wv if wv.dim() == 1 else wv.reshape(-1)
    sw = sw * s if s != 1.0 else sw
    if sw.dtype != w.dtype:
        sw = sw.to(w.dtype)
    return torch.addcmul(w, w, sw.unsqueeze(1) if w.dim() == 2 else sw.reshape((-1,) + (1,) * (w.dim() - 1)))


def rows_usable(w: torch.Tensor, wv: torch.Tensor) -> bool:
    """Whether :func:`scale_rows` runs: ``LYCO_IA3_ROWS_KERNEL`` (:mod:`.graph_policy`, captured steps by default — a
    Triton launch binds its arguments in Python, where an eager step waits on the host), the kernels usable on W's
    device and dtype (:func:`usable`), W and w contiguous, no autograd to record (the kernel is not differentiable)
    and ``w`` one entry per row of W."""
    if not graph_policy.wanted("LYCO_IA3_ROWS_KERNEL"):
        return False
    if (w.requires_grad or wv.requires_grad) and torch.is_grad_enabled():
        return False
    return w.is_contiguous() and wv.is_contiguous() and wv.numel() == w.shape[0] and usable(w)


#: the most layers one launch of :func:`scale_rows_multi` or :func:`channel_finish` serves (a self-attention's q, k, v)
MEMBERS = 3


def _slots(ts: list) -> list:
    """Up to :data:`MEMBERS` tensors padded to that many with the first (never read: a zero count stands beside it)."""
    return list(ts) + [ts[0]] * (MEMBERS - len(ts))


def _rows_out(ws) -> tuple:
    """The stacked ``W′`` the multi-member row kernels write (every W contiguous, ``(rows, k)`` with one k), the Ws
    in :data:`MEMBERS` slots, their element counts (0 in unused slots) and the launch's program count."""
    if len(ws) > MEMBERS:
        raise ValueError(f"lyco: (IA)³ row scaling: {len(ws)} weights in one launch, at most {MEMBERS}")
    k = ws[0].numel() // ws[0].shape[0]
    if any(not w.is_contiguous() or w.numel() // w.shape[0] != k or w.dtype != ws[0].dtype for w in ws):
        raise ValueError("lyco: (IA)³ row scaling: the weights of one launch must be contiguous, of one dtype and "
                         f"with one row length (got {[tuple(w.shape) for w in ws]})")
    rows = sum(w.shape[0] for w in ws)
    out = torch.empty((rows,) + tuple(ws[0].shape[1:]), device=ws[0].device, dtype=ws[0].dtype)
    ns = [w.numel() for w in ws] + [0] * (MEMBERS - len(ws))
    blk = _BUILD_CFG["BLOCK"]
    return out, _slots(ws), ns, sum(_cdiv(n, blk) for n in ns)


def scale_rows_multi(ws, wvs, s: float) -> torch.Tensor:
    """:func:`scale_rows` of up to :data:`MEMBERS` weights (one row length, contiguous) and their vectors in one launch,
    the results one below the other in one tensor ``(Σ rows, …)`` — a self-attention's ``[Wq′; Wk′; Wv′]`` for one
    GEMM (:class:`.ia3._SharedKeepOutput`). The caller checks :func:`rows_usable` for each."""
    out, wsl, ns, blocks = _rows_out(tuple(ws))
    blk, warps = _BUILD_CFG["BLOCK"], _BUILD_CFG["num_warps"]
    _rows_kernel[(blocks,)](*wsl, *_slots([v.reshape(-1) for v in wvs]), out, *ns, out[0].numel(), float(s),
                            HAS_S=s != 1.0, BLOCK=blk, num_warps=warps)
    return out


def scale_rows(w: torch.Tensor, wv: torch.Tensor, s: float) -> torch.Tensor:
    """:func:`scale_rows_torch` in one Triton launch (``(IA)³``'s output-mode weight ``W + s·(W ⊙ w)`` rows, the
    rebuilt op's and :class:`.ia3._KeepOutput`'s build, forward and backward): W read once, W′ written once, the
    product and sum in fp32 with a single rounding (torch's ``addcmul`` computes the same in fp32 opmath; run 206
    counts where the two differ on the GPU: none at any SD1.5 or SDXL shape). Torch launches a generic broadcast
    kernel there (run 204's trace: 352 launches, 2.40 ms of SD1.5 b8's captured step); run 206 timed the builds of a
    step at 2.09 ms with ``addcmul`` and 1.09 with this kernel (SDXL b4: 13.63 and 6.04). The caller checks
    :func:`rows_usable`."""
    return scale_rows_multi((w,), (wv,), s)


#: :func:`channel_grad_bcl`'s launch: channels and positions a program reads per step, warps, programs aimed at (not
#: swept: run 211 timed the step with this setting only)
_BCL_CFG = dict(BC=32, BL=128, num_warps=8, programs=528)


def channel_grad_bcl(gy: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, w: torch.Tensor, s: float,
                     weight: torch.Tensor | None = None):
    """:func:`channel_grad` for a conv's output: ``∂y`` and ``y`` ``(B, C, L)`` (any strides: NCHW's positions
    contiguous, or channels-last), the sums over batch and positions — programs over (batch × position chunk, channel
    block), fp32 partial sums per program, then :func:`channel_finish` (with ``weight``: W′ too, ``(∂w, W′)``). The
    caller checks :func:`usable`."""
    nb, c, n = y.shape
    bc, bl, warps, programs = (_BCL_CFG[k] for k in ("BC", "BL", "num_warps", "programs"))
    grid_c = _cdiv(c, bc)
    split = max(1, min(_cdiv(n, bl), programs // (grid_c * nb)))
    chunk = _cdiv(_cdiv(n, split), bl) * bl
    split = _cdiv(n, chunk)
    part = torch.empty(nb * split, c, device=y.device, dtype=torch.float32)
    _partial_bcl_kernel[(nb * split, grid_c)](
        gy, y, bias if bias is not None else y, part, c, n, chunk, split, *gy.stride(), *y.stride(),
        HAS_BIAS=bias is not None, BC=bc, BL=bl, num_warps=warps)
    return channel_finish(part, w, s, weight)


def channel_grad_bcl_torch(gy: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, w: torch.Tensor,
                           s: float) -> torch.Tensor:
    """:func:`channel_grad_bcl` in torch (fp32 math, or float64 for float64 tensors)."""
    dt = torch.promote_types(y.dtype, torch.float32)
    v = y.to(dt) if bias is None else y.to(dt) - bias.to(dt)[:, None]
    return channel_finish_torch((gy.to(dt) * v).sum((0, 2))[None], w, s)


def _self_test(device, dtype) -> bool:
    return self_test(device, dtype, _compare, "the (IA)³ channel-gradient Triton kernels")


def _compare(device, dtype) -> str | None:
    """Ragged shapes (partial row and column blocks, several row blocks per program), with and without a bias, a
    scale near zero (the clamp), a strided ∂y: against :func:`channel_grad_torch`."""
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    for n, c, bias in ((1000, 200, True), (77, 33, False)):
        gy = torch.randn(n, c + 5, generator=g).to(device, dtype)[:, 5:]
        y = torch.randn(n, c, generator=g).to(device, dtype)
        b = torch.randn(c, generator=g).to(device, dtype) if bias else None
        w = torch.randn(c, generator=g).to(device) * 0.3
        w[0] = (-1.0 + 2.0 ** -8) / 0.7  # |d| ≈ 2⁻⁸: the clamp (not d = 0, whose sign an FMA may flip: run 162)
        got = channel_grad(gy, y, b, w, 0.7)
        ref = channel_grad_torch(gy, y, b, w, 0.7)
        worst = max(worst, ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item())
    if worst > 1e-3:
        return f"its self-test's relative error is {worst:.2e}"
    # the row scaling: a ragged last block, W of a conv's shape, an fp32 w with s ≠ 1 and a 16-bit w with s = 1; W′ is
    # one rounding of W + W ⊙ c either way, so at most one unit in the last place from torch's addcmul
    for shape, wdt, s in (((300, 77), torch.float32, 0.7), ((40, 8, 3, 3), dtype, 1.0)):
        w = torch.randn(shape, generator=g).to(device, dtype)
        wv = (torch.randn(shape[0], generator=g) * 0.3).to(device, wdt)
        got, ref = scale_rows(w, wv, s).float(), scale_rows_torch(w, wv, s).float()
        ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(torch.finfo(dtype).tiny)
        if bool(((got - ref).abs() > ulp).any()):
            return "its row scaling differs from torch's addcmul by more than one unit in the last place"
    # a conv's output (B, C, L): ∂y channels-last, y not (the 1×1 conv before a transformer's reshape)
    gy = torch.randn(3, 50, 37, generator=g).to(device, dtype).transpose(1, 2)
    y = torch.randn(3, 37, 50, generator=g).to(device, dtype)
    b = torch.randn(37, generator=g).to(device, dtype)
    w = (torch.randn(37, generator=g) * 0.3).to(device)
    got, ref = channel_grad_bcl(gy, y, b, w, 0.7), channel_grad_bcl_torch(gy, y, b, w, 0.7)
    err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    if err > 1e-3:
        return f"its conv-output channel gradient's relative error is {err:.2e}"
    # ∂w and W′ from one launch (change 122): the same bits as the two kernels apart
    gy, y = torch.randn(300, 40, generator=g).to(device, dtype), torch.randn(300, 40, generator=g).to(device, dtype)
    w = (torch.randn(40, generator=g) * 0.3).to(device)
    W = torch.randn(40, 70, generator=g).to(device, dtype)
    gw, w2 = channel_grad(gy, y, None, w, 0.7, W)
    if not (torch.equal(gw, channel_grad(gy, y, None, w, 0.7)) and torch.equal(w2, scale_rows(W, w, 0.7))):
        return "its combined launch differs from the two kernels apart"
    # three layers' outputs side by side (a self-attention's q, k, v as one GEMM): ∂w per member and the stacked W′
    cs = (16, 9, 15)
    ws = [torch.randn(c, 70, generator=g).to(device, dtype) for c in cs]
    wvs = [(torch.randn(c, generator=g) * 0.3).to(device) for c in cs]
    gws, w2 = channel_grad(gy, y, None, tuple(wvs), 0.7, tuple(ws))
    ref = channel_grad_torch(gy, y, None, torch.cat(wvs), 0.7)
    err = ((torch.cat(gws).float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    if err > 1e-3:
        return f"its stacked layers' channel gradient's relative error is {err:.2e}"
    stacked = torch.cat([scale_rows_torch(a, v, 0.7) for a, v in zip(ws, wvs)]).float()
    ulp = torch.finfo(dtype).eps * stacked.abs().clamp_min(torch.finfo(dtype).tiny)
    if bool(((w2.float() - stacked).abs() > ulp).any()) or not torch.equal(w2, scale_rows_multi(ws, wvs, 0.7)):
        return "its stacked layers' row scaling differs from torch's addcmul (or between its two launches)"
    # the output-scale form (change 129): the forward pass over z, and ∂y ⊙ (1 + s·w) written by the channel pass
    z = torch.randn(77, 300, generator=g).to(device, dtype)
    w = (torch.randn(300, generator=g) * 0.3).to(device)
    b = torch.randn(300, generator=g).to(device, dtype)
    ref = scale_cols_torch(z, w, 0.7, b).float()
    got = scale_cols(z.clone(), w, 0.7, b).float()
    tol = torch.finfo(dtype).eps * ref.abs() + 1e-5 * (z.float().abs() + b.float().abs())
    if bool(((got - ref).abs() > tol).any()):
        return "its column scaling differs from torch's by more than one unit in the last place"
    gw, gs = channel_grad(z, z, b, w, 0.7, scaled=True)
    ref = (z.float() * col_scale_torch(w, 0.7, torch.float32)).to(dtype).float()
    tol = torch.finfo(dtype).eps * ref.abs() + 1e-5 * z.float().abs()
    if bool(((gs.float() - ref).abs() > tol).any()) or not torch.equal(gw, channel_grad(z, z, b, w, 0.7)):
        return "its scaled gradient differs from torch's (or its channel gradient from the unscaled launch's)"
    return None


if triton is not None:

    @triton.jit
    def _partial_kernel(G, Y, B, P, N, C, ROWS, sg, sy, WV, GS, s, HAS_BIAS: tl.constexpr, SCALED: tl.constexpr,
                        BM: tl.constexpr, BC: tl.constexpr):
        # SCALED: also GS = ∂y ⊙ (1 + s·w), contiguous (N, C), as ∂y is read
        pm = tl.program_id(0)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        cmask = cols < C
        if HAS_BIAS:
            b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        if SCALED:
            d = 1.0 + s * tl.load(WV + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = tl.zeros((BC,), dtype=tl.float32)
        first = pm * ROWS
        for i in range(0, ROWS, BM):
            rows = first + i + tl.arange(0, BM)
            m = (rows < N)[:, None] & cmask[None, :]
            gv = tl.load(G + rows[:, None] * sg + cols[None, :], mask=m, other=0.0).to(tl.float32)
            yv = tl.load(Y + rows[:, None] * sy + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if SCALED:
                tl.store(GS + rows[:, None] * C + cols[None, :], (gv * d[None, :]).to(GS.dtype.element_ty), mask=m)
            if HAS_BIAS:
                yv = tl.where(m, yv - b[None, :], 0.0)
            acc += tl.sum(gv * yv, axis=0)
        tl.store(P + pm * C + cols, acc, mask=cmask)

    @triton.jit
    def _cols_kernel(Z, WV, B, N, C, sz, s, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        cmask = cols < C
        m = (rows < N)[:, None] & cmask[None, :]
        d = 1.0 + s * tl.load(WV + cols, mask=cmask, other=0.0).to(tl.float32)
        z = tl.load(Z + rows[:, None] * sz + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = z * d[None, :]
        if HAS_BIAS:
            y += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Z + rows[:, None] * sz + cols[None, :], y.to(Z.dtype.element_ty), mask=m)

    @triton.jit
    def _partial_bcl_kernel(G, Y, B, P, C, L, CHUNK, SPLIT, gsb, gsc, gsl, ysb, ysc, ysl, HAS_BIAS: tl.constexpr,
                            BC: tl.constexpr, BL: tl.constexpr):
        pb = tl.program_id(0)
        bi = pb // SPLIT
        start = (pb % SPLIT) * CHUNK
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        cmask = cols < C
        if HAS_BIAS:
            b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = tl.zeros((BC,), dtype=tl.float32)
        for i in range(0, CHUNK, BL):
            pos = start + i + tl.arange(0, BL)
            m = cmask[:, None] & (pos < L)[None, :]
            gv = tl.load(G + bi * gsb + cols[:, None] * gsc + pos[None, :] * gsl, mask=m, other=0.0).to(tl.float32)
            yv = tl.load(Y + bi * ysb + cols[:, None] * ysc + pos[None, :] * ysl, mask=m, other=0.0).to(tl.float32)
            if HAS_BIAS:
                yv = tl.where(m, yv - b[:, None], 0.0)
            acc += tl.sum(gv * yv, axis=1)
        tl.store(P + pb * C + cols, acc, mask=cmask)

    @triton.jit
    def _finish_kernel(P, W0, W1, W2, C0, C01, OUT, GM, C, s, lo, BC: tl.constexpr):
        _finish_body(P, W0, W1, W2, C0, C01, OUT, GM, C, s, lo, tl.program_id(0), BC)

    @triton.jit
    def _finish_body(P, W0, W1, W2, C0, C01, OUT, GM, C, s, lo, pid, BC: tl.constexpr):
        # columns [0, C0) read member 0's vector W0, [C0, C01) W1's, [C01, C) W2's (one member: C0 = C01 = C)
        cols = pid * BC + tl.arange(0, BC)
        cmask = cols < C
        acc = tl.zeros((BC,), dtype=tl.float32)
        for i in range(0, GM):
            acc += tl.load(P + i * C + cols, mask=cmask, other=0.0)
        v = tl.load(W0 + cols, mask=cmask & (cols < C0), other=0.0).to(tl.float32)
        v += tl.load(W1 + (cols - C0), mask=cmask & (cols >= C0) & (cols < C01), other=0.0).to(tl.float32)
        v += tl.load(W2 + (cols - C01), mask=cmask & (cols >= C01), other=0.0).to(tl.float32)
        d = 1.0 + s * v
        d = tl.where(tl.abs(d) < lo, tl.where(d < 0, -lo, lo), d)
        tl.store(OUT + cols, (s * acc / d).to(OUT.dtype.element_ty), mask=cmask)

    @triton.jit
    def _rows_kernel(W0, W1, W2, S0, S1, S2, OUT, N0, N1, N2, K, s, HAS_S: tl.constexpr, BLOCK: tl.constexpr):
        _rows_multi_body(W0, W1, W2, S0, S1, S2, OUT, N0, N1, N2, K, s, tl.program_id(0), HAS_S, BLOCK)

    @triton.jit
    def _rows_multi_body(W0, W1, W2, S0, S1, S2, OUT, N0, N1, N2, K, s, pid, HAS_S: tl.constexpr,
                         BLOCK: tl.constexpr):
        # member i's W_i (N_i elements, rows of K) scaled by its S_i into OUT after the members before it; a launch
        # has exactly the programs of its members' blocks, so a slot with N_i = 0 is never reached
        nb0 = tl.cdiv(N0, BLOCK)
        nb01 = nb0 + tl.cdiv(N1, BLOCK)
        if pid < nb0:
            _rows_body(W0, S0, OUT, N0, K, s, pid, HAS_S, BLOCK)
        elif pid < nb01:
            _rows_body(W1, S1, OUT + N0, N1, K, s, pid - nb0, HAS_S, BLOCK)
        else:
            _rows_body(W2, S2, OUT + N0 + N1, N2, K, s, pid - nb01, HAS_S, BLOCK)

    @triton.jit
    def _rows_body(W, SW, OUT, N, K, s, pid, HAS_S: tl.constexpr, BLOCK: tl.constexpr):
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
        c = tl.load(SW + offs // K, mask=m, other=0.0)
        if HAS_S:
            # s·w in w's own dtype first (torch's ``sw * s``), then W's dtype (the cast before the addcmul)
            c = (c.to(tl.float32) * s).to(SW.dtype.element_ty)
        c = c.to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + offs, (w + w * c).to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _finish_rows_kernel(P, W0, W1, W2, C0, C01, OUT, GM, C, s, lo, T0, T1, T2, WOUT, N0, N1, N2, KW, NFIN,
                            HAS_S: tl.constexpr, BC: tl.constexpr, BLOCK: tl.constexpr):
        # the first NFIN programs: _finish_kernel's; the rest: _rows_kernel's (W′ for the ∂x GEMM) — one launch
        pid = tl.program_id(0)
        if pid < NFIN:
            _finish_body(P, W0, W1, W2, C0, C01, OUT, GM, C, s, lo, pid, BC)
        else:
            _rows_multi_body(T0, T1, T2, W0, W1, W2, WOUT, N0, N1, N2, KW, s, pid - NFIN, HAS_S, BLOCK)

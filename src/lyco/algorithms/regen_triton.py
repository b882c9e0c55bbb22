"""A low-rank down's weight gradient from what its input is made of, in Triton on CUDA (:func:`weight_grad`): the two
tensors of a product (below), or a layer norm's input, mean and 1/σ, weight and bias (change 119).

``∂D = s·∂hᵀ·(a ⊙ b)`` — where the bypass op rebuilds its input ``x = a ⊙ b`` in backward from what the producing mul
keeps anyway (:mod:`.regen`: a GEGLU's operands before ``ff.net.2``), this kernel reads a and b and forms x tile by
tile in registers, so x is never written. Torch's form is two passes more: the mul writes x (read a and b, write x),
the GEMM reads x again — on an SD1.5 b8 step ≈ 1.5 GB more traffic for the 16 ``ff.net.2`` layers (by their shapes:
370 M elements of x in bf16, two passes), what change 117 (benchmarks/NOTES.md) cost in time.

The first launch: programs over row splits × column blocks of x, each a ``(r, BK)`` fp32 partial product over its rows
(``tl.dot`` of ∂hᵀ's tile with x's), stored per row split — no atomics: deterministic, so a captured step replays
bit for bit what its eager warm-up computed. The second sums the partials, scales by s, and adds into the
gradient (the trainer's fp32 ``.grad``, as the op's ``beta = 1`` GEMM does) or writes it in the asked dtype.

Numerics (decision): x's tile is ``(a·b)`` computed in fp32 and rounded to a's dtype with round-to-nearest-even —
what torch's bf16/fp16 mul writes, element for element — so the products are the ones the rebuilt x gives; only
the order of the fp32 sums differs from cuBLAS's (their relative difference is fp32 rounding, ≈ 1e-6). A layer
norm's tile is ``(u − μ)·(1/σ)·γ + β`` in fp32, rounded once: within one rounding of what the norm wrote
(:func:`.regen._find_norm`). The norm's input may be 3-D of any strides (SD1.5's norm1 reads the 1×1 ``proj_in``
conv's NCHW output permuted to tokens × channels: no 2-D view); a rank over 64 (a shared-input group's stacked
downs) runs as blocks of 64 rows of ∂D, each reading the operands again.

:func:`geglu_backward` (change 120) goes one step further where x is a GEGLU's ``a ⊙ gelu(g)``: one kernel reads the
projection's output ``[a | g]`` and ∂x, writes the GEGLU's input gradient ∂p — torch's three backward nodes' result,
their roundings kept — and forms ∂D from the same tiles (:func:`.regen.find_geglu`).

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
    try:
        from triton.language.extra import libdevice
    except ImportError:  # an older Triton: tl.exp (ex2.approx) instead of CUDA's expf
        libdevice = None

#: per kind, the rows and columns of x a program of the first launch reads per step of its loop, its warps and
#: pipeline stages (``benchmarks/experiments/regen_wgrad_bench.py``, H100). ``mul`` (runs 184–185): 64 × 64 best of
#: 64/128/256 × 32/64/128 rows and columns — 0.58 ms summed over SD1.5 b8's 16 ``ff.net.2`` products, 2.64 ms over
#: SDXL b4's 70, against 1.43 and 6.44 for the mul and cuBLAS (0.30 and 1.24 on a kept x). ``layernorm`` (run 189,
#: narrower rows: 320–1280 columns): 128 × 64 — 0.55 ms over SD1.5 b8's 48 norm outputs' products (0.72 at 64 × 64),
#: 2.19 over SDXL b4's 210 (3.09); with the second launch over 256 columns (run 191) 0.46 and 2.01, against cuBLAS on
#: a kept x 0.41 and 1.78
_CFG = {"mul": {"BN": 64, "BK": 64, "num_warps": 4, "num_stages": 6},
        "layernorm": {"BN": 128, "BK": 64, "num_warps": 4, "num_stages": 4}}
#: programs the first launch aims at (row splits × column blocks × rank blocks): one per SM of an H100 — best of
#: 132–1056 for both kinds (more programs, more partials to sum)
_PROGRAMS = 132
#: the second launch's columns per program: 256 (runs 190–191; 1024 before, with as few as r·K/1024 programs for a
#: 320-column norm's product; summing 16 row splits per load instead of one was slower, run 191)
_FIN_BC = 256
#: the largest rank the kernel takes: ranks above 64 run as blocks of 64 rows of ∂D, each reading the operands again
#: (a shared-input group's stacked downs: LoHa's three rank-64 Khatri–Rao downs are 192)
MAX_RANK = 256
#: ∂D's rows per program (the accumulator is that × BK fp32 registers)
_RB = 64

#: (device, dtype) → whether the kernels passed their self-test there
_CHECKED: dict = {}

_KIND = {"mul": 0, "layernorm": 1}


class Operands:
    """What ∂D's kernel forms x from, as 2-D rows with unit column stride: ``mul`` — ``(a, b)``; ``layernorm`` — ``(u,
    mean, rstd, weight or None, bias or None)``, u as rows or 3-D of any strides, mean and 1/σ one per row
    (:func:`operands`)."""

    __slots__ = ("kind", "tensors")

    def __init__(self, kind: str, tensors: tuple):
        self.kind, self.tensors = kind, tensors

    def value(self) -> torch.Tensor:
        """x as torch computes it from the same tensors (2-D): the mul's product, or :func:`.regen._layer_norm_value`."""
        t = self.tensors
        if self.kind == "mul":
            return torch.mul(t[0], t[1])
        from .regen import _layer_norm_value
        u = t[0].reshape(-1, t[0].shape[-1])
        return _layer_norm_value((u, t[1].unsqueeze(1), t[2].unsqueeze(1)) + tuple(v for v in t[3:] if v is not None),
                                 t[3] is not None, t[4] is not None)


def _span(t: torch.Tensor) -> int:
    """The largest element offset a kernel computes into t (its strides over its shape)."""
    return sum((d - 1) * st for d, st in zip(t.shape, t.stride()))


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """t as 2-D rows with unit column stride without a copy, else None."""
    if t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def operands(kind: str, param, kept, cd: torch.dtype) -> Operands | None:
    """The kernel's operands for a :class:`.regen.Regen` of ``kind`` and its kept tensors, or None where the kernel
    does not take them: a kind it does not form, x's operands not in the compute dtype ``cd`` or not as rows of unit
    column stride (a GEGLU's ``a`` is a strided half of its projection's output: a view, taken)."""
    if kind == "mul":
        ts = (_rows(kept[0]), _rows(kept[1]))
        if any(t is None or t.dtype != cd for t in ts):
            return None
        return Operands(kind, ts)
    if kind == "layernorm":
        # the norm's input as rows, or 3-D as it came (SD1.5's norm1 reads the 1×1 proj_in conv's NCHW output
        # permuted to (batch, h·w, channels): rows 1 apart, channels h·w apart — no 2-D view, read as is)
        u = _rows(kept[0])
        if u is None and kept[0].dim() == 3:
            u = kept[0]
        if u is None or u.dtype != cd or not (kept[1].is_contiguous() and kept[2].is_contiguous()):
            return None
        mean, rstd = kept[1].view(-1), kept[2].view(-1)
        has_w, has_b = param
        w = kept[3] if has_w else None
        b = kept[3 + has_w] if has_b else None
        if any(t is not None and t.stride(0) != 1 for t in (w, b)):
            return None
        return Operands(kind, (u, mean, rstd, w, b))
    return None


def usable(ops: Operands, r: int) -> bool:
    """Whether :func:`weight_grad` runs on these operands at rank r, ∂h in x's dtype (module doc)."""
    t = ops.tensors[0]
    return enabled(t) and r <= MAX_RANK and gate(_CHECKED, t.device, t.dtype, _self_test)


def weight_grad_torch(gh: torch.Tensor, ops: Operands, s: float, dt: torch.dtype = torch.float64) -> torch.Tensor:
    """:func:`weight_grad`'s value in torch: x as :meth:`Operands.value` makes it, then ``s·∂hᵀ·x`` in ``dt`` —
    float64 by default, which no TF32 setting touches (a benchmark that allows TF32 made an fp32 reference 2.4e-4
    off and the self-test turn the kernels off: run 185)."""
    return s * gh.to(dt).t() @ ops.value().to(dt)


def weight_grad(gh: torch.Tensor, ops: Operands, s: float, dt: torch.dtype | None = None,
                into: torch.Tensor | None = None) -> torch.Tensor | None:
    """``s·∂hᵀ·x`` for ``gh`` ``(N, r)`` (any strides) in x's dtype, x ``(N, K)`` formed from ``ops``: into ``into``
    (``(r, K)``, contiguous, any float dtype; None returned) where given, else a new ``(r, K)`` tensor in ``dt``
    (x's dtype if None). The caller checks :func:`usable`."""
    n, r = gh.shape
    t = ops.tensors
    a = t[0]
    k = a.shape[-1]
    cfg = _CFG[ops.kind]
    bn, bk = cfg["BN"], cfg["BK"]
    rp = max(16, min(_RB, triton.next_power_of_2(r)))
    grid_k, grid_r = _cdiv(k, bk), _cdiv(r, rp)
    grid_n = max(1, min(_cdiv(n, bn), _PROGRAMS // (grid_k * grid_r)))
    rows = _cdiv(_cdiv(n, grid_n), bn) * bn  # rows per program, whole steps of the loop
    grid_n = _cdiv(n, rows)
    part = torch.empty(grid_n, r, k, device=a.device, dtype=torch.float32)
    if ops.kind == "mul":
        b, mean, rstd, w, bias = t[1], a, a, a, a
    else:
        b, (mean, rstd, w, bias) = a, t[1:]
    if a.dim() == 3:  # (batch, t, K) of any strides: row n is (n // t, n % t)
        t_len, sab, sat, sac = a.shape[1], a.stride(0), a.stride(1), a.stride(2)
    else:
        t_len, sab, sat, sac = n, 0, a.stride(0), 1
    big = max(_span(a), _span(b), _span(gh)) >= 2 ** 31  # offsets in int64 then
    _partial_kernel[(grid_n, grid_k, grid_r)](
        gh, a, b, mean, rstd, w if w is not None else a, bias if bias is not None else a, part, n, r, k, rows,
        gh.stride(0), gh.stride(1), t_len, sab, sat, sac, b.stride(0), KIND=_KIND[ops.kind], HAS_W=w is not None,
        HAS_B=bias is not None, RP=rp, BN=bn, BK=bk, BIG=big, UPCAST=_UPCAST,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    out = into if into is not None else torch.empty(r, k, device=a.device, dtype=dt or a.dtype)
    _finish_kernel[(_cdiv(r * k, _FIN_BC),)](part, out, grid_n, r * k, float(s), ADD=into is not None, BC=_FIN_BC)
    return None if into is not None else out


def product_grad(gh: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, dt: torch.dtype | None = None,
                 into: torch.Tensor | None = None) -> torch.Tensor | None:
    """:func:`weight_grad` of ``x = a ⊙ b`` (``a``, ``b`` ``(N, K)`` with unit column stride)."""
    return weight_grad(gh, Operands("mul", (a, b)), s, dt, into)


#: the GEGLU backward's (:func:`geglu_backward`) rows and columns of K per step of its loop, warps, pipeline stages and
#: the programs it aims at (row splits × column blocks). H100, ``benchmarks/experiments/geglu_bwd_bench.py``, summed
#: over SD1.5 b8's 16 and SDXL b4's 70 GEGLUs: run 195 swept 32–128 × 64–128 tiles over 132–1056 programs (64 × 64 at
#: 264: 2.75 and 13.07 ms; 32 × 64, 4 warps, 3 stages at 528: 1.79 and 8.39), run 196 16–32 × 64–128, 2–4 warps, 2–3
#: stages over 528–2112: 16 × 64, 2 warps, 3 stages at 1056 — **1.71 and 7.53 ms**, against 4.85 and 21.69 for torch's
#: three nodes and change 118's ∂D kernel (4.23 and 19.01 for the nodes alone: the frozen model's own GEGLU backward)
_GEGLU_CFG = {"BN": 16, "BK": 64, "num_warps": 2, "num_stages": 3, "programs": 1056}
#: the largest rank :func:`geglu_backward` takes (one block of ∂D's rows: the elementwise part runs once)
GEGLU_MAX_RANK = 64
_GEGLU_CHECKED: dict = {}


def geglu_usable(p: torch.Tensor, r: int) -> bool:
    """Whether :func:`geglu_backward` runs on a GEGLU projection's output ``p`` (rows of ``[a | g]``) at rank r:
    :func:`.lowrank_triton.enabled`, rows of unit column stride, r ≤ :data:`GEGLU_MAX_RANK`, its self-test passed on
    the device and dtype."""
    return (enabled(p) and r <= GEGLU_MAX_RANK and p.stride(-1) == 1 and p.shape[-1] % 2 == 0
            and gate(_GEGLU_CHECKED, p.device, p.dtype, _geglu_self_test))


def geglu_torch(gx: torch.Tensor, p: torch.Tensor):
    """``(∂p, x)``: the backward of ``x = a ⊙ gelu(g)`` for ``p = [a | g]`` (rows) as torch's autograd runs it —
    the mul's ``∂x·gelu(g)`` and ``∂x·a``, GELU's backward, the split's concatenation — bit for bit on the same
    device, and x rebuilt as the forward computed it."""
    import torch.nn.functional as F
    a, g = p.chunk(2, -1)
    b = F.gelu(g)
    gp = torch.cat([gx * b, torch.ops.aten.gelu_backward(gx * a, g)], -1)
    return gp, a * b


def geglu_input_grad(gx: torch.Tensor, p: torch.Tensor, chan=None) -> torch.Tensor:
    """∂p of a GEGLU whose output's gradient is gx (any leading shape, rows of x), in p's shape: by
    :func:`geglu_backward` without ∂D where :func:`geglu_usable` holds now, else :func:`geglu_torch` — for an op
    that took p in x's place and has no down to form (output-mode (IA)³, the benchmarks' ``floor-geglu``). ``chan``:
    :func:`geglu_backward`'s (offered only by the kernel)."""
    p2 = p.reshape(-1, p.shape[-1])
    gx2 = gx.reshape(-1, gx.shape[-1])
    gp = geglu_backward(gx2, p2, None, chan=chan)[0] if geglu_usable(p2, 1) else geglu_torch(gx2, p2)[0]
    return gp.view(p.shape)


def geglu_backward(gx: torch.Tensor, p: torch.Tensor, gh: torch.Tensor | None, s: float = 1.0,
                   dt: torch.dtype | None = None, into: torch.Tensor | None = None, chan=None):
    """``(∂p, ∂D)`` in one pass over a GEGLU: ``p = [a | g]`` ``(N, 2K)`` rows of unit column stride (the projection's
    output), ``gx`` ``(N, K)`` the gradient of ``x = a ⊙ gelu(g)`` (unit column stride, any row stride), ``gh``
    ``(N, r)`` the consumer's ``∂h = ∂y·U`` (any strides). ∂p is ``[∂x·gelu(g) | GELU′(g)·(∂x·a)]`` with each of
    torch's roundings (module doc of :mod:`.regen`'s ``find_geglu``), a new ``(N, 2K)`` tensor in p's dtype; ``∂D =
    s·∂hᵀ·x`` with x formed in registers as the mul wrote it — into ``into`` (``(r, K)``, contiguous; None returned)
    where given, else a new tensor in ``dt`` (p's dtype if None); ``gh`` None: ∂p alone (``(∂p, None)``: a frozen
    layer after the GEGLU, the benchmarks' ``floor-geglu``). Reads a, g and ∂x once each and writes ∂p once,
    where torch's backward of the same three ops reads ∂x twice and writes ∂a, ∂b, ∂g and the concatenation, and the
    consumer's ∂D reads a and b again. The caller checks :func:`geglu_usable`.

    ``chan`` (:class:`.scale_triton.ChannelLink`, the producer's — output-mode (IA)³ keeping p): the same pass also
    sums ``∂p[:, c]·(p[:, c] − b[c])`` over its rows per column (∂p as written, b the producer's bias in p's dtype,
    fp32 sums per program) and offers those partial sums with ∂p to the link, so that the producer's ∂w needs no
    second read of ∂p and p (change 121)."""
    n, k2 = p.shape
    k, r = k2 // 2, (gh.shape[1] if gh is not None else 1)
    cfg = _GEGLU_CFG
    bn, bk = cfg["BN"], cfg["BK"]
    rp = max(16, triton.next_power_of_2(r))
    grid_k = _cdiv(k, bk)
    grid_n = max(1, min(_cdiv(n, bn), cfg["programs"] // grid_k))
    rows = _cdiv(_cdiv(n, grid_n), bn) * bn
    grid_n = _cdiv(n, rows)
    has_d = gh is not None
    part = torch.empty(grid_n, r, k, device=p.device, dtype=torch.float32) if has_d else p
    gp = torch.empty(n, k2, device=p.device, dtype=p.dtype)
    has_w = chan is not None
    pw = torch.empty(grid_n, k2, device=p.device, dtype=torch.float32) if has_w else p
    wb = chan.bias if has_w else None
    if wb is not None and wb.dtype != p.dtype:
        wb = wb.to(p.dtype)  # as the producer's own channel gradient reads it (y's dtype)
    big = max(_span(p), _span(gx), _span(gh) if has_d else 0, gp.numel()) >= 2 ** 31
    _geglu_kernel[(grid_n, grid_k)](
        gx, p, gh if has_d else p, gp, part, pw, wb if wb is not None else p, n, r, k, rows, gx.stride(0),
        p.stride(0), gh.stride(0) if has_d else 0, gh.stride(1) if has_d else 0, RP=rp, BN=bn, BK=bk, BIG=big,
        HAS_D=has_d, HAS_W=has_w, HAS_WB=wb is not None, UPCAST=_UPCAST,
        LIBDEVICE=libdevice is not None and not _UPCAST, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if has_w:
        chan.offer(pw, gp)
    if not has_d:
        return gp, None
    out = into if into is not None else torch.empty(r, k, device=p.device, dtype=dt or p.dtype)
    _finish_kernel[(_cdiv(r * k, _FIN_BC),)](part, out, grid_n, r * k, float(s), ADD=into is not None, BC=_FIN_BC)
    return gp, (None if into is not None else out)


def _geglu_self_test(device, dtype) -> bool:
    return self_test(device, dtype, _geglu_compare, "the fused GEGLU backward's Triton kernels")


def _geglu_compare(device, dtype) -> str | None:
    """Ragged shapes, a strided ∂x and ∂h, ∂D written and added into fp32: ∂p against :func:`geglu_torch` on the
    device (within one rounding of the dtype, relative to the largest entry), ∂D against float64."""
    g = torch.Generator().manual_seed(7)
    worst_p = worst_d = 0.0
    for n, k, r, add in ((1000, 200, 16, True), (77, 40, 5, False)):
        p = (torch.randn(n, 2 * k, generator=g) * 2).to(device, dtype)
        gx = torch.randn(n, k + 8, generator=g).to(device, dtype)[:, 8:]
        gh = torch.randn(n, r + 3, generator=g).to(device, dtype)[:, 3:]
        ref_p, x = geglu_torch(gx, p)
        ref_d = 0.7 * gh.double().t() @ x.double()
        if add:
            base = torch.randn(r, k, generator=g).to(device)
            got_d = base.clone()
            got_p, _ = geglu_backward(gx, p, gh, 0.7, into=got_d)
            ref_d = ref_d + base.double()
        else:
            got_p, got_d = geglu_backward(gx, p, gh, 0.7, torch.float32)
        worst_p = max(worst_p, ((got_p.double() - ref_p.double()).abs().max() / ref_p.double().abs().max()).item())
        worst_d = max(worst_d, ((got_d.double() - ref_d).abs().max() / ref_d.abs().max()).item())
    if worst_d > 1e-4:
        return f"its self-test's ∂D relative error is {worst_d:.2e}"
    if worst_p > 2.0 ** -6:
        return f"its self-test's ∂p relative error is {worst_p:.2e}"
    # the producer's channel sums (change 121): against float64 from the ∂p the kernel wrote
    from .scale_triton import ChannelLink
    p = (torch.randn(500, 2 * 90, generator=g) * 2).to(device, dtype)
    gx = torch.randn(500, 90, generator=g).to(device, dtype)
    link = ChannelLink(torch.randn(2 * 90, generator=g).to(device, dtype))
    gp, _ = geglu_backward(gx, p, None, chan=link)
    ref = (gp.double() * (p.double() - link.bias.double())).sum(0)
    err = ((link.part.double().sum(0) - ref).abs().max() / ref.abs().max()).item()
    return None if err <= 1e-4 else f"its self-test's channel-sum relative error is {err:.2e}"


def _self_test(device, dtype) -> bool:
    return self_test(device, dtype, _compare, "the regenerated-input weight-gradient Triton kernels")


def _layer_norm_operands(n: int, k: int, device, dtype, g, affine: bool = True) -> Operands:
    """A layer norm's input, its per-row mean and 1/σ (fp32, as CUDA's kernel keeps them), weight and bias."""
    u = (torch.randn(n, k, generator=g) * 2 + 0.5).to(device, dtype)
    uf = u.float()
    mean = uf.mean(1)
    rstd = (uf.var(1, unbiased=False) + 1e-5).rsqrt()
    w = torch.randn(k, generator=g).to(device, dtype) if affine else None
    b = torch.randn(k, generator=g).to(device, dtype) if affine else None
    return Operands("layernorm", (u, mean, rstd, w, b))


def _compare(device, dtype) -> str | None:
    """Ragged shapes (partial row and column blocks, several row steps per program, a rank below 16 and one over a
    rank block), a strided a and ∂h, a layer norm's operands, written and added into fp32: against
    :func:`weight_grad_torch` (float64)."""
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for n, k, r, add, kind in ((1000, 200, 16, True, "mul"), (77, 33, 5, False, "mul"),
                               (300, 96, 80, True, "layernorm")):
        if kind == "mul":
            ops = Operands(kind, (torch.randn(n, 2 * k, generator=g).to(device, dtype)[:, :k],
                                  torch.randn(n, k, generator=g).to(device, dtype)))
        else:
            ops = _layer_norm_operands(n, k, device, dtype, g)
        gh = torch.randn(n, r + 3, generator=g).to(device, dtype)[:, 3:]
        ref = weight_grad_torch(gh, ops, 0.7)
        if add:
            base = torch.randn(r, k, generator=g).to(device)
            got = base.clone()
            weight_grad(gh, ops, 0.7, into=got)
            ref = ref + base.double()
        else:
            got = weight_grad(gh, ops, 0.7, torch.float32)
        worst = max(worst, ((got.double() - ref).abs().max() / ref.abs().max()).item())
    return None if worst <= 1e-4 else f"its self-test's relative error is {worst:.2e}"


if triton is not None:

    @triton.jit
    def _partial_kernel(H, A, B, M, S, W, C, P, N, R, K, ROWS, shn, shr, T, sab, sat, sac, sb, KIND: tl.constexpr,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, BIG: tl.constexpr, UPCAST: tl.constexpr):
        pn = tl.program_id(0)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        cmask = cols < K
        rr = tl.program_id(2) * RP + tl.arange(0, RP)
        rmask = rr < R
        if KIND == 1:
            if HAS_W:
                wv = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
            if HAS_B:
                cv = tl.load(C + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = tl.zeros((RP, BK), dtype=tl.float32)
        first = pn * ROWS
        for i in range(0, ROWS, BN):
            rows = first + i + tl.arange(0, BN)
            nmask = rows < N
            if BIG:
                rows = rows.to(tl.int64)
            # ∂h's tile read transposed (run 191: read along r and transposed in the dot, 1.2–1.4× slower)
            ht = tl.load(H + rows[None, :] * shn + rr[:, None] * shr, mask=rmask[:, None] & nmask[None, :],
                         other=0.0)
            m = nmask[:, None] & cmask[None, :]
            av = tl.load(A + ((rows // T) * sab + (rows % T) * sat)[:, None] + cols[None, :] * sac, mask=m, other=0.0)
            if KIND == 0:
                bv = tl.load(B + rows[:, None] * sb + cols[None, :], mask=m, other=0.0)
                x = (av.to(tl.float32) * bv.to(tl.float32)).to(av.dtype)  # the mul's own rounding (module doc)
            else:
                mu = tl.load(M + rows, mask=nmask, other=0.0).to(tl.float32)
                rs = tl.load(S + rows, mask=nmask, other=0.0).to(tl.float32)
                xf = (av.to(tl.float32) - mu[:, None]) * rs[:, None]
                if HAS_W:
                    xf = xf * wv[None, :]
                if HAS_B:
                    xf = xf + cv[None, :]
                x = xf.to(av.dtype)  # rows past N: ∂h's are zero there
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

    @triton.jit
    def _geglu_kernel(GX, P, H, GP, PART, PW, WB, N, R, K, ROWS, sgx, sp, shn, shr, RP: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr, BIG: tl.constexpr, HAS_D: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_WB: tl.constexpr, UPCAST: tl.constexpr, LIBDEVICE: tl.constexpr):
        # per element, in fp32 with torch's roundings to p's dtype between its three ops (CUDA's GELU: x·0.5·(1 +
        # erf(x/√2)) forward; backward dy·(cdf + x·pdf), cdf = 0.5·(1 + erf(x/√2)), pdf = exp(−x²/2)/√(2π)):
        #   b = gelu(g) rounded, x = a·b rounded, ∂a = ∂x·b rounded, ∂b = ∂x·a rounded, ∂g = ∂b·gelu′(g) rounded
        pn = tl.program_id(0)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        cmask = cols < K
        rr = tl.arange(0, RP)
        rmask = rr < R
        acc = tl.zeros((RP, BK), dtype=tl.float32)
        # HAS_W: the producer's channel sums Σ ∂p·(p − b) per column of each half (geglu_backward's chan)
        wa = tl.zeros((BK,), dtype=tl.float32)
        wg = tl.zeros((BK,), dtype=tl.float32)
        if HAS_WB:
            ba = tl.load(WB + cols, mask=cmask, other=0.0).to(tl.float32)
            bg = tl.load(WB + K + cols, mask=cmask, other=0.0).to(tl.float32)
        first = pn * ROWS
        for i in range(0, ROWS, BN):
            rows = first + i + tl.arange(0, BN)
            nmask = rows < N
            if BIG:
                rows = rows.to(tl.int64)
            m = nmask[:, None] & cmask[None, :]
            off = rows[:, None] * sp + cols[None, :]
            av = tl.load(P + off, mask=m, other=0.0)
            gv = tl.load(P + off + K, mask=m, other=0.0)
            dx = tl.load(GX + rows[:, None] * sgx + cols[None, :], mask=m, other=0.0).to(tl.float32)
            af = av.to(tl.float32)
            gf = gv.to(tl.float32)
            e = tl.math.erf(gf * 0.7071067811865476)
            b = ((gf * 0.5) * (1.0 + e)).to(av.dtype).to(tl.float32)
            x = (af * b).to(av.dtype)
            db = (dx * af).to(av.dtype).to(tl.float32)
            if LIBDEVICE:  # CUDA's expf, as torch's kernel calls it (tl.exp is ex2.approx)
                ex = libdevice.exp((-0.5 * gf) * gf)
            else:
                ex = tl.exp((-0.5 * gf) * gf)
            dg = db * (0.5 * (1.0 + e) + gf * (ex * 0.3989422804014327))
            out = rows[:, None] * (2 * K) + cols[None, :]
            da = (dx * b).to(av.dtype)
            dgr = dg.to(av.dtype)
            tl.store(GP + out, da, mask=m)
            tl.store(GP + out + K, dgr, mask=m)
            if HAS_W:
                if HAS_WB:
                    va = af - ba[None, :]
                    vg = gf - bg[None, :]
                else:
                    va = af
                    vg = gf
                wa += tl.sum(tl.where(m, da.to(tl.float32) * va, 0.0), axis=0)
                wg += tl.sum(tl.where(m, dgr.to(tl.float32) * vg, 0.0), axis=0)
            if HAS_D:
                ht = tl.load(H + rows[None, :] * shn + rr[:, None] * shr, mask=rmask[:, None] & nmask[None, :],
                             other=0.0)
                if UPCAST:
                    acc = tl.dot(ht.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(ht, x, acc)
        if HAS_D:
            tl.store(PART + pn * R * K + rr[:, None] * K + cols[None, :], acc,
                     mask=rmask[:, None] & cmask[None, :])
        if HAS_W:
            tl.store(PW + pn * (2 * K) + cols, wa, mask=cmask)
            tl.store(PW + pn * (2 * K) + K + cols, wg, mask=cmask)

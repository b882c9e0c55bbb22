"""A low-rank adapted linear layer's forward as **one** Triton GEMM on Hopper GPUs (TMA):
``y = x·Wᵀ + b + s·h·Uᵀ`` with ``h = x·Dᵀ`` accumulated in the same k-loop (the x tile the frozen product
loads is multiplied by D's tile too) and written out for the backward — where the bypass op
(:mod:`.lowrank`) runs three kernels: cuBLAS's frozen GEMM, a thin down GEMM that reads x again and an
in-place ``addmm_`` of the up that reads and writes y again.

The kernel: TMA tensor-descriptor loads, one persistent program per SM walking the output tiles (grouped
for L2 reuse), the k-loop flattened across tiles (``tl.range(flatten=True)``) so the load pipeline does not
drain between tiles; the tiles of the first column block store h (the others compute it too and drop it: N
is at most a few column blocks where this kernel is taken). Accumulated in fp32, y rounded once (the
three-kernel form rounds ``x·Wᵀ + b`` first, then the sum), h rounded to the dtype before the up's product
(as the three-kernel form, whose up reads the stored h).

Where it pays (:func:`.lowrank._fused_gemm`; H100, bf16, rank 16, CUDA-graph replays over four input sets — run 132,
``benchmarks/experiments/fused_gemm_check.py``, benchmarks/NOTES.md change 91): many rows (positions) over a narrow
output. 32768 × 320 → 320 (SD1.5 b8's 64×64 attention projections) 27.9 µs against 44.4 for the three kernels
(cuBLAS's frozen GEMM alone 19.2), with a bias 29.3 against 57.8 (cuBLAS's biased GEMM alone 31.0); 32768 × 1280 →
320 77.4 against 113.7; 8192 × 640 → 640 22.4 against 27.5. No gain at 2048 × 1280 → 1280 (21.9 against 21.6). At
8192 × 640 → 5120 (a GEGLU projection) it beats the three kernels (153.0 against 177.2) but not cuBLAS's product
alone (85.8), which the op's ``[x │ h]`` form (:func:`.lowrank._cat_pays`) uses there. The other sizes' shapes
(run 160, ``fused_gemm_check.py --shapes other``; SD1.5 b1, SDXL b1 and b4): gains down to 1024 rows wherever the output
is at most 640 wide — 1024 × 640 → 640 6.5 against 10.5 µs, 4096 × 320 → 320 8.0 against 12.0, 4096 × 640 → 640 14.6
against 17.3, 16384 × 640 → 640 36.7 against 46.5, 16384 × 2560 → 640 114.7 against 137.5 — and none at 1280 outputs
(1024 and 4096 rows: 1.00–1.04×) or 5120 inputs (4096 × 5120 → 1280: 1.23×).

Selected by :func:`usable` and :func:`supports`: :func:`.lowrank_triton.enabled` (Triton, CUDA bf16/fp16,
``LYCO_TRITON`` not ``0``, not under ``torch.compile``), a GPU with TMA (compute capability ≥ 9.0), Triton's
host-side tensor descriptors, operands TMA can address (contiguous rows, 16-byte aligned), rank ≤ 64, and
this kernel's self-test passed on the device and dtype (once per process, :func:`.lowrank_triton.gate`).
CPU tests run it in Triton's interpreter (fp32: the interpreter's bf16 ``tl.dot`` is wrong in Triton 3.6).
"""

from __future__ import annotations

import os

import torch

from .lowrank_triton import _cdiv, enabled, gate, self_test, sm_count, triton

if triton is not None:
    import triton.language as tl
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover - a Triton without host-side descriptors
        TensorDescriptor = None
else:  # pragma: no cover - depends on the install
    TensorDescriptor = None

#: the largest rank the kernel takes (h's accumulator is BM × rank-padded-to-a-power-of-two in registers)
MAX_RANK = 64
#: (BM, BN, BK, stages, warps) by rows: the best of run 51's eight configurations at 32768 rows (128-row
#: tiles) and at 8192 (64-row tiles); run 133's sweep of eleven found none better by more than 2 %
_CFG_LARGE = (128, 128, 64, 4, 8)
_CFG_SMALL = (64, 128, 64, 4, 4)
#: rows from which the first configuration is taken
_LARGE_ROWS = 16384
#: ``LYCO_FUSED_GEMM_CFG`` value → its two configurations (a tuning knob for other GPUs; parsed once)
_PARSED: dict = {}


def _config(m: int) -> tuple:
    """(BM, BN, BK, stages, warps) for ``m`` rows: :data:`_CFG_LARGE` from :data:`_LARGE_ROWS` rows on, else
    :data:`_CFG_SMALL`, or the two given as ``LYCO_FUSED_GEMM_CFG="BM,BN,BK,stages,warps/BM,BN,BK,stages,warps"``."""
    env = os.environ.get("LYCO_FUSED_GEMM_CFG")
    if env:
        cfgs = _PARSED.get(env)
        if cfgs is None:
            try:
                cfgs = tuple(tuple(int(v) for v in part.split(",")) for part in env.split("/"))
                if len(cfgs) != 2 or any(len(c) != 5 for c in cfgs):
                    raise ValueError
            except ValueError:
                raise ValueError(f"LYCO_FUSED_GEMM_CFG={env!r}: expected 'BM,BN,BK,stages,warps/BM,BN,BK,stages,warps' "
                                 "(the configuration from 16384 rows on, then the one below)") from None
            _PARSED[env] = cfgs
        return cfgs[0] if m >= _LARGE_ROWS else cfgs[1]
    return _CFG_LARGE if m >= _LARGE_ROWS else _CFG_SMALL


#: (device, dtype) → whether the kernel passed its self-test there (once per process)
_CHECKED: dict = {}


def usable(x: torch.Tensor) -> bool:
    """Whether the kernel can run on x's device and dtype (module doc), its self-test included."""
    if TensorDescriptor is None or not enabled(x):
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    return gate(_CHECKED, x.device, x.dtype, _self_test)


def _tma_ok(t: torch.Tensor) -> bool:
    """A 2-D operand TMA can address: unit column stride, rows 16-byte aligned, a 16-byte aligned start."""
    e = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * e) % 16 == 0 and t.data_ptr() % 16 == 0
            and (t.shape[1] * e) % 16 == 0)


def supports(x, w, b, d, u, h=None) -> bool:
    """Operands the kernel takes: x ``(M, K)``, W ``(N, K)``, D ``(r, K)``, U ``(N, r)`` (and h ``(M, r)`` to write
    into, e.g. a column slice of a wider tensor) of one dtype, TMA-addressable (:func:`_tma_ok`), r ≤
    :data:`MAX_RANK`, a contiguous 1-D bias of N or none."""
    dt = x.dtype
    if any(t.dtype != dt for t in (w, d, u)) or (b is not None and (b.dtype != dt or b.dim() != 1
                                                                     or b.stride(0) != 1)):
        return False
    m, k = x.shape
    n, r = w.shape[0], d.shape[0]
    if w.shape != (n, k) or d.shape != (r, k) or u.shape != (n, r) or r > MAX_RANK or (b is not None
                                                                                        and b.shape[0] != n):
        return False
    if h is not None and (h.shape != (m, r) or h.dtype != dt or not _tma_ok(h)):
        return False
    return all(_tma_ok(t) for t in (x, w, d, u))


def fused_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, d: torch.Tensor, u: torch.Tensor,
                 s: float, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, h)``: ``y = x·Wᵀ + b + s·h·Uᵀ`` and ``h = x·Dᵀ`` (written into the given ``h``), one launch; the
    operands as :func:`supports` takes them."""
    m, k = x.shape
    n, r = w.shape[0], d.shape[0]
    br = max(16, triton.next_power_of_2(r))
    bm, bn, bk, stages, warps = _config(m)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if h is None:
        h = torch.empty((m, r), device=x.device, dtype=x.dtype)
    x_d = TensorDescriptor.from_tensor(x, [bm, bk])
    w_d = TensorDescriptor.from_tensor(w, [bn, bk])
    d_d = TensorDescriptor.from_tensor(d, [br, bk])
    u_d = TensorDescriptor.from_tensor(u, [bn, br])
    y_d = TensorDescriptor.from_tensor(y, [bm, bn])
    h_d = TensorDescriptor.from_tensor(h, [bm, br])
    progs = min(sm_count(x.device), _cdiv(m, bm) * _cdiv(n, bn))
    _fused_kernel[(progs,)](x_d, w_d, d_d, u_d, y_d, h_d, b if b is not None else y, m, n, k, float(s),
                            HAS_BIAS=b is not None, BM=bm, BN=bn, BK=bk, BR=br, GROUP_M=8, NUM_SMS=progs,
                            num_stages=stages, num_warps=warps)
    return y, h


def _self_test(device, dtype) -> bool:
    """The kernel on ragged shapes (partial tiles on every edge, rank 8 and 16, with and without a bias, h into a
    column slice) against the same math in fp32 torch; False (and a warning) on an exception or a relative error
    above 2 %."""
    return self_test(device, dtype, _compare, "the fused low-rank GEMM")


def _compare(device, dtype) -> str | None:
    g = torch.Generator().manual_seed(91)
    worst = 0.0
    for m, k, n, r, bias in ((300, 200, 72, 16, True), (129, 64, 136, 8, False)):
        x, w, d, u = (torch.randn(*sh, generator=g).to(device, dtype) for sh in ((m, k), (n, k), (r, k), (n, r)))
        b = torch.randn(n, generator=g).to(device, dtype) if bias else None
        hbuf = torch.full((m, r + 8), float("nan"), device=device, dtype=dtype)
        y, h = fused_linear(x, w, b, d, u, 0.5, hbuf[:, 8:])
        h_ref = x.float() @ d.float().t()
        y_ref = x.float() @ w.float().t() + 0.5 * h_ref.to(dtype).float() @ u.float().t()
        if b is not None:
            y_ref = y_ref + b.float()
        for a, ref in ((y, y_ref), (h, h_ref)):
            worst = max(worst, ((a.float() - ref).abs().max() / ref.abs().max()).item())
    return None if worst <= 2e-2 else f"its self-test's relative error is {worst:.2e}"


if triton is not None:

    @triton.jit
    def _tile(tile_id, num_m, num_n, GROUP_M: tl.constexpr):
        """Output tile ``tile_id``'s (row block, column block), row blocks grouped by GROUP_M for L2 reuse."""
        per_group = GROUP_M * num_n
        first_m = (tile_id // per_group) * GROUP_M
        group_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile_id % group_m)
        pid_n = (tile_id % per_group) // group_m
        return pid_m, pid_n

    @triton.jit
    def _fused_kernel(x_desc, w_desc, d_desc, u_desc, y_desc, h_desc, BIAS, M, N, K, s,
                      HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      BR: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr):
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        k_tiles = tl.cdiv(K, BK)
        for tile_id in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile(tile_id, num_m, num_n, GROUP_M)
            om = pid_m * BM
            on = pid_n * BN
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            hacc = tl.zeros((BM, BR), dtype=tl.float32)
            for ki in range(k_tiles):
                ok = ki * BK
                a = x_desc.load([om, ok])
                acc = tl.dot(a, w_desc.load([on, ok]).T, acc)
                hacc = tl.dot(a, d_desc.load([0, ok]).T, hacc)  # rows of D past r: TMA's zero padding
            h = hacc.to(y_desc.dtype)
            if pid_n == 0:
                h_desc.store([om, 0], h)  # columns past r are clipped by the descriptor
            acc += tl.dot(h, u_desc.load([on, 0]).T) * s
            if HAS_BIAS:
                rn = on + tl.arange(0, BN)
                acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            y_desc.store([om, on], acc.to(y_desc.dtype))

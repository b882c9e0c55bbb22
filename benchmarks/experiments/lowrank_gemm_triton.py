"""Experiment (issue 7, GPU run 11; not part of the library): ``C = A·B (+ bias) + s·(A·P)·Q`` as one
Triton GEMM kernel, optionally writing ``H = A·P``. Measured on an H200 (``benchmarks/kernel_bench.py``,
``results/run11_h200_kernel/``): at the SD1.5 b8 shapes this GEMM runs 1.5–2.7× slower than cuBLAS's
for the frozen product alone, so the fused layer lost to three cuBLAS kernels (one layer fwd+bwd summed
over the shapes: 2183 vs 1810 µs; the LoRA step 76.7 vs 74.3 ms as a graph). Kept to reproduce that.
Needs Triton ≥ 3 (``TRITON_INTERPRET=1`` runs it on CPU tensors in fp32/fp16; bf16 is unsupported there).

A frozen layer plus a rank-r adapter is this product twice:

* forward, ``y = x·Wᵀ + b + s·(x·Dᵀ)·Uᵀ``: A = x (M×K), B = Wᵀ, P = Dᵀ (K×r), Q = Uᵀ (r×N), H = h = x·Dᵀ
  (kept for ∂U);
* input gradient, ``∂x = ∂y·W + s·(∂y·U)·D``: A = ∂y (M×N), B = W, P = U (N×r), Q = D (r×K),
  H = ∂y·U (the ∂D GEMM's operand).

Each output tile accumulates ``A·B`` and the thin ``A·P`` (r padded to ≥ 16 columns) over the same
loads of A, then adds ``s·(A·P)·Q`` before its single store: the adapter costs no extra pass over
the activations and no extra launch, where the torch form needs three kernels (the frozen GEMM, the
down GEMM re-reading A, the up GEMM read-modify-writing C) forward and again backward. ``A·P`` is
recomputed by every column block of tiles (an extra r/BLOCK_N of the FLOPs) and stored by the first.

Numerics: fp32 accumulation; ``A·P`` is rounded to the input dtype before its product with Q (as the
torch form stores ``h`` in that dtype); the output is rounded once (the torch form rounds ``A·B + b``
and then the sum).
"""

from __future__ import annotations

import torch

try:
    import triton
    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

if HAVE_TRITON:
    import triton.language as tl

    @triton.jit
    def _kernel(A, B, P, Q, BIAS, C, H, M, N, K, R, s,
                sam, sak, sbk, sbn, spk, spr, sqr, sqn, scm, scn, shm, shr,
                HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % per_group) % group_m)
        pid_n = (pid % per_group) // group_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        rr = tl.arange(0, BR)
        m_ok = rm < M
        n_ok = rn < N
        r_ok = rr < R
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        hacc = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            k_ok = kk < K
            a = tl.load(A + rm[:, None] * sam + kk[None, :] * sak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(B + kk[:, None] * sbk + rn[None, :] * sbn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            p = tl.load(P + kk[:, None] * spk + rr[None, :] * spr, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            hacc = tl.dot(a, p, hacc)
        h = hacc.to(C.dtype.element_ty)
        if WRITE_H:
            if pid_n == 0:
                tl.store(H + rm[:, None] * shm + rr[None, :] * shr, h, mask=m_ok[:, None] & r_ok[None, :])
        q = tl.load(Q + rr[:, None] * sqr + rn[None, :] * sqn, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(h, q) * s
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(C + rm[:, None] * scm + rn[None, :] * scn, acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


#: largest rank the kernel takes (the thin accumulator lives in registers beside the tile)
MAX_RANK = 64


def _config(m: int, n: int):
    """Tile sizes from the shape (no autotuning: a fixed choice compiles a handful of variants once and
    keeps CUDA-graph capture free of benchmarking runs)."""
    bn = 128 if n > 64 else 64
    bm = 128 if m > 64 else 64
    return bm, bn, 64, (8 if bm * bn >= 128 * 128 else 4), 3


def lowrank_gemm(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor, q: torch.Tensor, s: float,
                 bias: torch.Tensor | None = None, want_h: bool = False):
    """``(C, H)`` with ``C = a·b (+ bias) + s·(a·p)·q`` and ``H = a·p`` (None unless ``want_h``).

    ``a`` (M×K), ``b`` (K×N), ``p`` (K×r), ``q`` (r×N), any strides, one floating dtype (``bias``
    (N,) may differ); r ≤ :data:`MAX_RANK`."""
    if not HAVE_TRITON:
        raise RuntimeError("lowrank_gemm_triton needs Triton >= 3 (pip install triton; on a CPU set "
                           "TRITON_INTERPRET=1 and use fp32/fp16 tensors)")
    m, k = a.shape
    n = b.shape[1]
    r = p.shape[1]
    if r > MAX_RANK:
        raise ValueError(f"lowrank_gemm: rank {r} > {MAX_RANK}")
    c = torch.empty((m, n), device=a.device, dtype=a.dtype)
    h = torch.empty((m, r), device=a.device, dtype=a.dtype) if want_h else c
    br = max(16, triton.next_power_of_2(r))
    bm, bn, bk, warps, stages = _config(m, n)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _kernel[grid](a, b, p, q, bias if bias is not None else c, c, h, m, n, k, r, float(s),
                  a.stride(0), a.stride(1), b.stride(0), b.stride(1), p.stride(0), p.stride(1),
                  q.stride(0), q.stride(1), c.stride(0), c.stride(1), h.stride(0), h.stride(1),
                  HAS_BIAS=bias is not None, WRITE_H=want_h, BM=bm, BN=bn, BK=bk, BR=br, GROUP_M=8,
                  num_warps=warps, num_stages=stages)
    return c, (h if want_h else None)

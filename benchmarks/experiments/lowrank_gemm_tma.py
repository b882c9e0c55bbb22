"""Experiment (issue 7, session 8; not part of the library): change 26's fused low-rank GEMM
``C = A·B (+ bias) + s·(A·P)·Q`` (``experiments/lowrank_gemm_triton.py``, 1.5–2.7× cuBLAS on the H200 in
run 11) rewritten the way Hopper GEMMs reach cuBLAS: TMA tensor-descriptor loads, one persistent program
per SM walking the output tiles (grouped for L2 reuse), the k-loop flattened across tiles so the load
pipeline does not drain between tiles (the SD layers have K = 320…5120: 5–80 k-steps per tile), and
optionally Triton's automatic warp specialisation. The question it answers: does the plain product reach
cuBLAS at the SD1.5 shapes? Only then can the fused adapter pay (run 11's arithmetic: the adapter's
extra passes cost ≈ 1 ms per step per 10 % of the frozen GEMMs' time).

Layouts (row-major descriptors; TMA wants the last dimension contiguous):

* forward ``y = x·Wᵀ + b + s·(x·Dᵀ)·Uᵀ``: A = x (M×K), B = W (N×K, ``B_KMAJOR``), P = D (r×K), Q = U (N×r);
* input gradient ``∂x = ∂y·W + s·(∂y·U)·D``: A = ∂y (M×K), B = W (K×N), P = U (K×r), Q = D (r×N).

``H = A·P`` (the forward's h, the backward's ∂y·U) is written by the tiles of the first column block.
With ``h`` given instead (computed beforehand by a thin cuBLAS GEMM, which the backward needs anyway for
∂U / ∂D), only the epilogue ``+ s·h·Q`` is fused: no second dot in the k-loop (run 51).

Checked on the CPU in Triton's interpreter against float64 by ``tests/test_experiment_tma_gemm.py``, and on
the device by the benchmark before it times anything.
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


# the grouped tile order of the library's kernel (lowrank_gemm.py, this experiment's forward form made a path)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
from lyco.algorithms.lowrank_gemm import _tile  # noqa: E402


@triton.jit
def _kernel(a_desc, b_desc, p_desc, q_desc, c_desc, h_desc, BIAS, M, N, K, s,
            B_KMAJOR: tl.constexpr, FUSED: tl.constexpr, H_IN: tl.constexpr, WRITE_H: tl.constexpr,
            HAS_BIAS: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
            NUM_SMS: tl.constexpr, WS: tl.constexpr, FLATTEN: tl.constexpr):
    start = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    num_tiles = num_m * num_n
    for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WS):
        pid_m, pid_n = _tile(tile_id, num_m, num_n, GROUP_M)
        om = pid_m * BM
        on = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        hacc = tl.zeros((BM, BR), dtype=tl.float32)
        for ki in range(k_tiles):
            ok = ki * BK
            a = a_desc.load([om, ok])
            if B_KMAJOR:
                b = b_desc.load([on, ok]).T
            else:
                b = b_desc.load([ok, on])
            acc = tl.dot(a, b, acc)
            if FUSED and not H_IN:
                if B_KMAJOR:
                    p = p_desc.load([0, ok]).T
                else:
                    p = p_desc.load([ok, 0])
                hacc = tl.dot(a, p, hacc)
        if FUSED:
            if H_IN:
                h = h_desc.load([om, 0])
            else:
                h = hacc.to(c_desc.dtype)
                if WRITE_H:
                    if pid_n == 0:
                        h_desc.store([om, 0], h)
            if B_KMAJOR:
                q = q_desc.load([on, 0]).T
            else:
                q = q_desc.load([0, on])
            acc += tl.dot(h, q) * s
        if HAS_BIAS:
            rn = on + tl.arange(0, BN)
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        c_desc.store([om, on], acc.to(c_desc.dtype))


_SMS = {}


def lowrank_gemm(a, b, p=None, q=None, s=1.0, bias=None, want_h=False, b_kmajor=True,
                 cfg=(128, 128, 64, 3, 8, False, True), h=None):
    """``(C, H)``: ``C = a·op(b) (+ bias) (+ s·(a·op(p))·op(q))``, op = transpose when ``b_kmajor``
    (weights stored out×in); with ``h`` (M×r, = ``a·op(p)`` computed by the caller) ``C = a·op(b) (+ bias)
    + s·h·op(q)`` and ``p`` unused. ``cfg`` = (BM, BN, BK, stages, warps, warp_specialize, flatten)."""
    bm, bn, bk, stages, warps, ws, flat = cfg
    m, k = a.shape
    n = b.shape[0] if b_kmajor else b.shape[1]
    h_in = h is not None
    fused = p is not None or h_in
    r = h.shape[1] if h_in else (p.shape[0] if b_kmajor else p.shape[1]) if fused else 16
    br = max(16, triton.next_power_of_2(r))
    if h_in and r != br:
        raise ValueError("lowrank_gemm: a given h must have a power-of-two width >= 16")
    c = torch.empty((m, n), device=a.device, dtype=a.dtype)
    if not h_in:
        h = torch.empty((m, r), device=a.device, dtype=a.dtype) if want_h else None
    a_d = TensorDescriptor.from_tensor(a, [bm, bk])
    b_d = TensorDescriptor.from_tensor(b, [bn, bk] if b_kmajor else [bk, bn])
    c_d = TensorDescriptor.from_tensor(c, [bm, bn])
    if fused:
        p_d = c_d if h_in else TensorDescriptor.from_tensor(p, [br, bk] if b_kmajor else [bk, br])
        q_d = TensorDescriptor.from_tensor(q, [bn, br] if b_kmajor else [br, bn])
    else:
        p_d = q_d = c_d
    h_d = TensorDescriptor.from_tensor(h, [bm, br]) if (want_h or h_in) else c_d
    dev = a.device.index or 0
    if dev not in _SMS:
        _SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count if a.is_cuda else 4
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    progs = min(_SMS[dev], tiles)
    _kernel[(progs,)](a_d, b_d, p_d, q_d, c_d, h_d, bias if bias is not None else c, m, n, k, float(s),
                      B_KMAJOR=b_kmajor, FUSED=fused, H_IN=h_in, WRITE_H=want_h and not h_in, HAS_BIAS=bias is not None,
                      BM=bm, BN=bn, BK=bk, BR=br, GROUP_M=8, NUM_SMS=progs, WS=ws, FLATTEN=flat,
                      num_stages=stages, num_warps=warps)
    return c, (h if want_h or h_in else None)


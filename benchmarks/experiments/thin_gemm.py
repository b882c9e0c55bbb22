#!/usr/bin/env python3
"""The adapter's thin gradient GEMMs alone: cuBLAS against Triton (issue 7, run 74).

In a LoRA step through the bypass op (``lyco/algorithms/lowrank.py``) the adapter's backward on a linear layer is
``∂U = s·∂yᵀh`` (out × r), ``∂h = ∂y·U`` (positions × r) and ``∂D = s·∂hᵀx`` (r × in): thin outputs, the whole
activation as the contraction. Run 71's kernel profile (SD1.5 b8, ``to_q`` at 64×64: 32768 positions, 320 → 320,
rank 16) had cuBLAS's split-K kernels for ∂U and ∂D at 12.8 and 11.0 µs plus two 2.7 µs reductions and memsets —
≈ 1.3 TB/s for 42 MB — while ``∂h`` (no split) read its 21 MB at 2.9 TB/s. This measures, per SD1.5 shape:

* ``torch``: ``gy.t() @ h``, ``gy @ U``, ``gh.t() @ x`` as the op runs them, and ``(h.t() @ gy).t()`` (the same
  product laid out for the other operand order);
* ``thin``: a Triton split-K kernel for ``Aᵀ·B`` — programs over (K splits × M tiles × N tiles), fp32 partials
  per split summed in a fixed order (deterministic: the trainer's graphs are checked bit-identical to eager);
* ``fused`` (out ≤ 512): one Triton kernel reading ∂y once for both ∂h and ∂U's partials.

Each timed as 20 calls captured in one CUDA graph, median of 7 replays, after a check against fp32 torch.

    python benchmarks/experiments/thin_gemm.py [--out DIR]
"""

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _common import graph_us  # noqa: E402


@triton.jit
def _atb_kernel(a_ptr, b_ptr, ws_ptr, K, M, N, KS, sak, sam, sbk, sbn,
                BK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """ws[s, m, n] = Σ_{k in split s} a[k, m]·b[k, n] (fp32)."""
    s, pm, pn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k0 = s * KS
    for kb in range(k0, tl.minimum(k0 + KS, K), BK):
        rk = kb + tl.arange(0, BK)
        km = rk < K
        a = tl.load(a_ptr + rk[:, None] * sak + rm[None, :] * sam, mask=km[:, None] & (rm[None, :] < M), other=0.0)
        b = tl.load(b_ptr + rk[:, None] * sbk + rn[None, :] * sbn, mask=km[:, None] & (rn[None, :] < N), other=0.0)
        acc += tl.dot(tl.trans(a), b)
    tl.store(ws_ptr + s * M * N + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def thin_atb(a, b, splits=None, BK=64, BM=64, BN=None, warps=4, stages=3):
    """``aᵀ·b`` (fp32) for a (K, M), b (K, N) with K ≫ M, N."""
    K, M = a.shape
    N = b.shape[1]
    BN = BN or max(16, min(128, triton.next_power_of_2(N)))
    BM = max(16, min(BM, triton.next_power_of_2(M)))
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    if splits is None:
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count
        splits = max(1, min(triton.cdiv(K, 4 * BK), triton.cdiv(4 * sms, tiles)))
    ks = triton.cdiv(triton.cdiv(K, splits), BK) * BK
    splits = triton.cdiv(K, ks)
    ws = torch.empty(splits, M, N, device=a.device, dtype=torch.float32)
    _atb_kernel[(splits, triton.cdiv(M, BM), triton.cdiv(N, BN))](
        a, b, ws, K, M, N, ks, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        BK=BK, BM=BM, BN=BN, num_warps=warps, num_stages=stages)
    return ws.sum(0) if splits > 1 else ws[0]


@triton.jit
def _fused_kernel(g_ptr, h_ptr, u_ptr, gh_ptr, ws_ptr, P, O, R, KS, sgp, sgo, shp, shr, suo, sur,
                  BK: tl.constexpr, BO: tl.constexpr, BR: tl.constexpr):
    """One read of ∂y (rows of split s): ∂h = ∂y·U stored, partial ∂U = ∂yᵀ·h into ws[s] (fp32)."""
    s = tl.program_id(0)
    ro = tl.arange(0, BO)
    rr = tl.arange(0, BR)
    om, rmask = ro < O, rr < R
    u = tl.load(u_ptr + ro[:, None] * suo + rr[None, :] * sur, mask=om[:, None] & rmask[None, :], other=0.0)
    acc = tl.zeros((BO, BR), dtype=tl.float32)
    p0 = s * KS
    for pb in range(p0, tl.minimum(p0 + KS, P), BK):
        rp = pb + tl.arange(0, BK)
        pm = rp < P
        g = tl.load(g_ptr + rp[:, None] * sgp + ro[None, :] * sgo, mask=pm[:, None] & om[None, :], other=0.0)
        h = tl.load(h_ptr + rp[:, None] * shp + rr[None, :] * shr, mask=pm[:, None] & rmask[None, :], other=0.0)
        gh = tl.dot(g, u)
        tl.store(gh_ptr + rp[:, None] * R + rr[None, :], gh.to(gh_ptr.dtype.element_ty),
                 mask=pm[:, None] & rmask[None, :])
        acc += tl.dot(tl.trans(g), h)
    tl.store(ws_ptr + s * O * R + ro[:, None] * R + rr[None, :], acc, mask=om[:, None] & rmask[None, :])


def fused_gu_gh(gy, h, u, BK=32, warps=8, stages=2, splits=None):
    """(∂y·U, ∂yᵀ·h in fp32) from one read of ∂y; out ≤ 512."""
    P, O = gy.shape
    R = h.shape[1]
    BO = max(16, triton.next_power_of_2(O))
    BR = max(16, triton.next_power_of_2(R))
    if splits is None:
        sms = torch.cuda.get_device_properties(gy.device).multi_processor_count
        splits = max(1, min(triton.cdiv(P, BK), 2 * sms))
    ks = triton.cdiv(triton.cdiv(P, splits), BK) * BK
    splits = triton.cdiv(P, ks)
    gh = torch.empty(P, R, device=gy.device, dtype=gy.dtype)
    ws = torch.empty(splits, O, R, device=gy.device, dtype=torch.float32)
    _fused_kernel[(splits,)](gy, h, u, gh, ws, P, O, R, ks, gy.stride(0), gy.stride(1), h.stride(0), h.stride(1),
                             u.stride(0), u.stride(1), BK=BK, BO=BO, BR=BR, num_warps=warps, num_stages=stages)
    return gh, ws.sum(0)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    a = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    # (name, positions, in, out, rank, layers of this shape per SD1.5 b8 step through the op)
    shapes = [("q/k/v/out 64x64", 32768, 320, 320, 16, 30), ("q/k/v/out 32x32", 8192, 640, 640, 16, 30),
              ("q/k/v/out 16x16", 2048, 1280, 1280, 16, 30), ("ff2 64x64", 32768, 1280, 320, 16, 5),
              ("ff2 32x32", 8192, 2560, 640, 16, 5), ("ff0 64x64 (dU only)", 32768, 320, 2560, 16, 5),
              ("lokr q 64x64", 32768, 320, 320, 128, 30), ("loha q 64x64", 32768, 320, 320, 64, 30)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, total = [], {}
    for name, P, I, O, R, count in shapes:
        x = torch.randn(P, I, device=dev, dtype=dt, generator=gen)
        gy = torch.randn(P, O, device=dev, dtype=dt, generator=gen)
        h = torch.randn(P, R, device=dev, dtype=dt, generator=gen)
        u = torch.randn(O, R, device=dev, dtype=dt, generator=gen) * 0.05
        ghh = torch.randn(P, R, device=dev, dtype=dt, generator=gen)
        ref_gu = gy.float().t() @ h.float()
        ref_gh = gy.float() @ u.float()
        ref_gd = ghh.float().t() @ x.float()
        row = {"name": name, "P": P, "in": I, "out": O, "r": R, "count": count}
        dU_only = "dU only" in name
        ways = {
            "torch": lambda: (gy.t() @ h, None if dU_only else gy @ u, ghh.t() @ x),
            "torch-swapped": lambda: ((h.t() @ gy).t(), None if dU_only else gy @ u, (x.t() @ ghh).t()),
            "thin": lambda: (thin_atb(gy, h), None if dU_only else gy @ u, thin_atb(ghh, x)),
        }
        if O <= 512 and not dU_only:
            ways["fused"] = lambda: (*reversed(fused_gu_gh(gy, h, u)), thin_atb(ghh, x))
        for w, fn in ways.items():
            got = fn()
            errs = [rel(got[0], ref_gu), rel(got[2], ref_gd)] + ([] if got[1] is None else [rel(got[1], ref_gh)])
            row[w + "_err"] = max(errs)
            row[w] = graph_us(fn, 20) if max(errs) < 2e-2 else None
            total[w] = total.get(w, 0.0) + (row[w] or row["torch"]) * count
        rows.append(row)
        print(f"{name:22s} " + "  ".join(f"{w} {row[w]:.1f}us (err {row[w + '_err']:.1e})" if row[w] else
                                          f"{w} WRONG {row[w + '_err']:.1e}" for w in ways), flush=True)
    print("summed over the step's layers of these shapes (ms): " + ", ".join(f"{w} {v / 1000:.2f}"
                                                                           for w, v in total.items()))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "thin_gemm.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "total_ms": total}, f, indent=1)


if __name__ == "__main__":
    main()

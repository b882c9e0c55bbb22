"""The fused low-rank GEMM experiment of issue 7 (``benchmarks/experiments/lowrank_gemm_tma.py``, H100 runs 50–51)
run in Triton's interpreter against float64 math, so that the benchmark that measured it keeps measuring a
correct kernel: both weight layouts (forward: weights out×in; input gradient: in the other order), with and
without the adapter, ragged shapes (partial tiles on every edge, TMA's zero padding), rank below the padded
width, bias, and the stored ``H = A·P``."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "experiments"))
import lowrank_gemm_tma as lg  # noqa: E402 - needs Triton: in the test extra (Linux x86-64)

CFG = (32, 32, 32, 2, 4, False, True)  # small tiles: several tiles and k-steps per program at these sizes


@pytest.mark.parametrize("kmajor", [True, False])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("m,k,n,r", [(70, 96, 72, 16), (33, 40, 48, 8)])
def test_matches_float64(triton_interpreter, kmajor, fused, m, k, n, r):
    g = torch.Generator().manual_seed(m + k + n + r)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) if kmajor else torch.randn(k, n, generator=g)
    p = torch.randn(r, k, generator=g) if kmajor else torch.randn(k, r, generator=g)
    q = torch.randn(n, r, generator=g) if kmajor else torch.randn(r, n, generator=g)
    bias = torch.randn(n, generator=g) if kmajor else None
    W, P, Q = (w.t(), p.t(), q.t()) if kmajor else (w, p, q)
    ref = x.double() @ W.double()
    if bias is not None:
        ref = ref + bias.double()
    if fused:
        hp = x.double() @ P.double()
        ref = ref + 0.7 * hp.float().double() @ Q.double()  # H is rounded to the output dtype first
        c, h = lg.lowrank_gemm(x, w, p, q, 0.7, bias, True, kmajor, CFG)
        torch.testing.assert_close(h.double(), hp, rtol=1e-5, atol=1e-4)
    else:
        c, h = lg.lowrank_gemm(x, w, bias=bias, b_kmajor=kmajor, cfg=CFG)
        assert h is None
    assert c.shape == (m, n)
    torch.testing.assert_close(c.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kmajor", [True, False])
def test_epilogue_form_matches_float64(triton_interpreter, kmajor):
    """``h`` given (the caller's thin GEMM): only ``+ s·h·Q`` is fused, ``p`` is not read."""
    m, k, n = 70, 96, 72
    g = torch.Generator().manual_seed(7)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) if kmajor else torch.randn(k, n, generator=g)
    h = torch.randn(m, 16, generator=g)
    q = torch.randn(n, 16, generator=g) if kmajor else torch.randn(16, n, generator=g)
    bias = torch.randn(n, generator=g) if kmajor else None
    W, Q = (w.t(), q.t()) if kmajor else (w, q)
    ref = x.double() @ W.double() + 0.7 * h.double() @ Q.double()
    if bias is not None:
        ref = ref + bias.double()
    c, h_out = lg.lowrank_gemm(x, w, None, q, 0.7, bias, False, kmajor, CFG, h=h)
    assert h_out is h
    torch.testing.assert_close(c.double(), ref, rtol=1e-5, atol=1e-4)

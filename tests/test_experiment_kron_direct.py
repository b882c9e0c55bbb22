"""The permuted form of LoKr's direct factor gradients (``benchmarks/experiments/kron_direct_shapes.py``: NOTES change
180, taken out of the library after run 334 lost with it; the experiment still times it beside the row form) against
float64 autograd through ``torch.kron`` — both contraction orders, one row and many, each gradient alone and both —
so that what the experiment times is a correct form."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "experiments"))
import kron_direct_shapes as kd  # noqa: E402

from test_lokr_direct import SHAPES, _reference  # noqa: E402


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_permuted_form_matches_float64(shape, rows, needs):
    L, M, K, N = shape
    g = torch.Generator().manual_seed(sum(shape) + rows)
    x = torch.randn(rows, M * N, generator=g, dtype=torch.float64)
    gy = torch.randn(rows, L * K, generator=g, dtype=torch.float64)
    w1 = torch.randn(L, M, generator=g, dtype=torch.float64)
    w2 = torch.randn(K, N, generator=g, dtype=torch.float64)
    got = kd.kron_linear_grads_permuted(x, gy, w1, w2, 0.7, (torch.float64, torch.float64), needs)
    for n, a, b in zip(needs, got, _reference(x, gy, w1, w2, 0.7)):
        if n:
            assert a.dtype == torch.float64 and a.shape == b.shape
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
        else:
            assert a is None

"""The permuted form of LoKr's direct factor gradients (``benchmarks/experiments/kron_direct_shapes.py``: NOTES change
180, taken out of the library after run 334 lost with it; the experiment still times it beside the row form) against
float64 autograd through ``torch.kron`` — both contraction orders, one row and many, each gradient alone and both —
so that what the experiment times is a correct form."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "experiments"))
import kron_direct_shapes as kd  # noqa: E402

from test_lokr_direct import SHAPES, check_direct_form  # noqa: E402


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_permuted_form_matches_float64(shape, rows, needs):
    check_direct_form(kd.kron_linear_grads_permuted, shape, rows, needs)

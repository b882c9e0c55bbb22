"""The forms of LoKr's merged weight that ``benchmarks/experiments/kron_merge_tiles.py`` times (prepared in session 49
for a GPU run) in Triton's interpreter against float64: the flat launch at a block of its own and the tiled launch at
the benchmark's tiles and smaller ones (ragged rows and columns, several tiles both ways, a transposed W2) — so that
the benchmark times correct kernels."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "experiments"))
import kron_merge_tiles as km  # noqa: E402 - needs Triton: in the test extra (Linux x86-64)

SHAPES = [(2, 5, 3, 7), (3, 9, 6, 33), (1, 130, 2, 3), (8, 20, 8, 20)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_flat_form_matches_float64(triton_interpreter, shape, transposed):
    g = torch.Generator().manual_seed(sum(shape))
    w, w1, w2 = km._inputs(shape, torch.device("cpu"), g, torch.float32)
    w2 = w2.t().contiguous().t() if transposed else w2
    assert km._err(km.merge_flat(w, w1, w2, 0.7, 64), km.reference(w, w1, w2, 0.7)) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("elements,cols,warps", [(64, 16, 4), (256, 32, 4)] + list(km.TILE_CFGS[:2]))
def test_tiled_form_matches_float64(triton_interpreter, shape, elements, cols, warps):
    g = torch.Generator().manual_seed(sum(shape) + elements)
    w, w1, w2 = km._inputs(shape, torch.device("cpu"), g, torch.float32)
    w2 = w2.t().contiguous().t()
    assert km._err(km.merge_tiled(w, w1, w2, 0.7, elements, cols, warps), km.reference(w, w1, w2, 0.7)) < 1e-6

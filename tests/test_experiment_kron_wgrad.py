"""The block form of LoKr's ∂W′ reductions (``benchmarks/experiments/kron_wgrad_tiles.py``, prepared in session 47 for
a GPU run) in Triton's interpreter against float64: ragged shapes (partial tiles of k and c, M not a power of two),
several tiles and warps — so that the benchmark that will time it times a correct kernel — and the library's launch
at the tile sizes the benchmark sets, likewise."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "experiments"))
import kron_wgrad_tiles as kw  # noqa: E402 - needs Triton: in the test extra (Linux x86-64)


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (4, 40, 4, 40), (3, 9, 6, 33), (1, 16, 1, 130)])
@pytest.mark.parametrize("tile,warps", [(64, 4), (256, 4), (1024, 8)])
def test_block_form_matches_float64(triton_interpreter, shape, tile, warps):
    g = torch.Generator().manual_seed(sum(shape) + tile)
    e, w1, w2 = kw._inputs(shape, torch.device("cpu"), g, torch.float32)
    want = kw.reference(e, w1, w2, 0.7)
    got = kw.kron_weight_grads_block(e, w1, w2, 0.7, tile=tile, warps=warps)
    assert kw._err(got, want) < 1e-5


@pytest.mark.parametrize("tile", [64, 512])
def test_library_launch_at_the_benchmark_tiles(triton_interpreter, tile):
    from lyco.algorithms import factor_triton
    g = torch.Generator().manual_seed(tile)
    e, w1, w2 = kw._inputs((3, 40, 5, 24), torch.device("cpu"), g, torch.float32)
    got = kw.kron_weight_grads_loop(e, w1, w2, 0.7, tile=tile)
    assert kw._err(got, kw.reference(e, w1, w2, 0.7)) < 1e-5
    # the library's own call: its tile, the same launch
    want = factor_triton.kron_weight_grads(e, w1, w2, 0.7)
    assert kw._err(want, kw.reference(e, w1, w2, 0.7)) < 1e-5


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (3, 9, 6, 33)])
@pytest.mark.parametrize("tile2,tile1", [(64, 256), (512, 4096)])
def test_onepass_form_at_the_benchmark_tiles(triton_interpreter, shape, tile2, tile1):
    """The one-pass form as the benchmark launches it (its tiles, any K·C) against float64: ragged (k, c) tiles, M not
    a power of two, several ∂W2 programs and, at the small ∂W1 tile, several (k, c) tiles a ∂W1 program."""
    g = torch.Generator().manual_seed(sum(shape) + tile2)
    e, w1, w2 = kw._inputs(shape, torch.device("cpu"), g, torch.float32)
    got = kw.kron_weight_grads_onepass(e, w1, w2, 0.7, tile2=tile2, tile1=tile1)
    assert kw._err(got, kw.reference(e, w1, w2, 0.7)) < 1e-5

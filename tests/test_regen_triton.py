"""``lyco.algorithms.regen_triton``: a low-rank down's weight gradient ``s·∂hᵀ·(a ⊙ b)`` read from the two operands
of the product, run on the CPU in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``) and checked
against float64 math written here. The bypass op's use of it is in tests/test_input_regen.py."""

from __future__ import annotations

import pytest
import torch

from lyco.algorithms import regen_triton


@pytest.fixture(scope="module")
def kern(triton_interpreter):
    assert regen_triton._UPCAST, "Triton was imported before tests/conftest.py set TRITON_INTERPRET"
    yield regen_triton


# relative to the largest entry. fp32: the interpreter's dot in fp32 (ieee), only the sums' order differs. bf16/fp16:
# the interpreter rounds the product x = a·b by truncation where torch (and the GPU's kernel) round to nearest —
# one ulp on some elements of x (2⁻⁸ bf16, 2⁻¹¹ fp16 relative), so against x as torch rounds it a few ulps of the
# sum's scale.
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _operands(n, k, r, dtype, seed, strided):
    g = torch.Generator().manual_seed(seed)
    if strided:  # a GEGLU's a: the first half of its projection's rows; ∂h a column slice of a wider tensor
        a = torch.randn(n, 2 * k, generator=g).to(dtype)[:, :k]
        gh = torch.randn(n, r + 5, generator=g).to(dtype)[:, 5:]
    else:
        a = torch.randn(n, k, generator=g).to(dtype)
        gh = torch.randn(n, r, generator=g).to(dtype)
    b = torch.randn(n, k, generator=g).to(dtype)
    return gh, a, b


def _float64(gh, a, b, s):
    x = (a.double() * b.double()).to(a.dtype).double()  # the product as the mul would store it
    return s * gh.double().t() @ x


def _rel(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("n,k,r", [(64, 128, 16), (1000, 200, 16), (77, 33, 5), (130, 70, 64), (3, 300, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strided", [False, True])
def test_product_grad_matches_float64(kern, n, k, r, dtype, strided):
    """Written in a new tensor (its dtype as asked) and added into an fp32 gradient, over partial row and column
    blocks, ranks below, at and above the tensor cores' 16, strided operands."""
    gh, a, b = _operands(n, k, r, dtype, n + k + r, strided)
    ref = _float64(gh, a, b, 0.375)
    got = kern.product_grad(gh, a, b, 0.375)
    assert got.dtype == dtype and got.shape == (r, k)
    # a result in the inputs' dtype carries its own rounding besides
    assert _rel(got, ref) < TOL[dtype] + (0 if dtype == torch.float32 else 2.0 ** -7)
    got32 = kern.product_grad(gh, a, b, 0.375, torch.float32)
    assert got32.dtype == torch.float32 and _rel(got32, ref) < TOL[dtype]
    base = torch.randn(r, k, generator=torch.Generator().manual_seed(1))
    into = base.clone()
    assert kern.product_grad(gh, a, b, 0.375, into=into) is None
    assert _rel(into, ref + base.double()) < TOL[dtype]


@pytest.mark.parametrize("programs", [1, 7, 10_000])
def test_row_splits_sum_to_the_same_and_repeat_bitwise(kern, monkeypatch, programs):
    """However many row splits the first launch takes (one, a few, one per row block), the sum is the product; the
    same call twice gives the same bits (no atomics)."""
    monkeypatch.setattr(kern, "_PROGRAMS", programs)
    gh, a, b = _operands(700, 150, 16, torch.float32, 9, True)
    ref = _float64(gh, a, b, 1.0)
    one = kern.product_grad(gh, a, b, 1.0)
    assert _rel(one, ref) < TOL[torch.float32]
    assert torch.equal(one, kern.product_grad(gh, a, b, 1.0))


def test_product_grad_torch_is_the_definition():
    gh, a, b = _operands(50, 20, 4, torch.bfloat16, 2, True)
    ref = _float64(gh, a, b, 0.5)
    assert _rel(regen_triton.product_grad_torch(gh, a, b, 0.5), ref) < 1e-6


def test_usable_only_for_cuda_half_tensors_of_one_dtype_and_rank_up_to_the_limit(monkeypatch):
    """The kernels are considered for CUDA bf16/fp16 operands of one dtype and rank ≤ MAX_RANK, never with
    LYCO_TRITON=0; a CPU tensor never. The self-test is not reached where the conditions fail."""
    from types import SimpleNamespace
    monkeypatch.delenv("LYCO_TRITON", raising=False)
    monkeypatch.setattr(regen_triton, "_CHECKED", {})
    monkeypatch.setattr(regen_triton, "_self_test", lambda dev, dt: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # a CPU torch cannot say

    def cuda(dtype):
        return SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda"))
    bf, hf = cuda(torch.bfloat16), cuda(torch.float16)
    assert regen_triton.usable(bf, bf, 16)
    assert regen_triton.usable(hf, hf, regen_triton.MAX_RANK)
    assert not regen_triton.usable(bf, hf, 16)
    assert not regen_triton.usable(bf, bf, regen_triton.MAX_RANK + 1)
    assert not regen_triton.usable(cuda(torch.float32), cuda(torch.float32), 16)
    cpu = torch.zeros(2, 2, dtype=torch.bfloat16)
    assert not regen_triton.usable(cpu, cpu, 16)
    monkeypatch.setenv("LYCO_TRITON", "0")
    assert not regen_triton.usable(bf, bf, 16)

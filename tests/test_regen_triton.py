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
    """However many row splits the first launch takes (one, a few, one per row block: 33, more than the second
    launch sums per step), the sum is the product; the same call twice gives the same bits (no atomics)."""
    monkeypatch.setattr(kern, "_PROGRAMS", programs)
    gh, a, b = _operands(2100, 150, 16, torch.float32, 9, True)
    ref = _float64(gh, a, b, 1.0)
    one = kern.product_grad(gh, a, b, 1.0)
    assert _rel(one, ref) < TOL[torch.float32]
    assert torch.equal(one, kern.product_grad(gh, a, b, 1.0))


def test_operands_and_usable(monkeypatch):
    """The kernel takes a product's two operands or a layer norm's input, stats, weight and bias — as rows in the
    compute dtype with unit column stride — for CUDA bf16/fp16 at rank ≤ MAX_RANK, never with LYCO_TRITON=0 or on a
    CPU tensor; the self-test is not reached where the conditions fail."""
    from types import SimpleNamespace
    a, b = torch.randn(2, 3, 8).bfloat16(), torch.randn(2, 3, 8).bfloat16()
    ops = regen_triton.operands("mul", None, (a, b), torch.bfloat16)
    assert ops.kind == "mul" and [t.shape for t in ops.tensors] == [(6, 8), (6, 8)]
    assert regen_triton.operands("mul", None, (a, b), torch.float16) is None  # not the compute dtype
    assert regen_triton.operands("mul", None, (a.transpose(1, 2), b.transpose(1, 2)), torch.bfloat16) is None
    assert regen_triton.operands("gelu", "none", (a,), torch.bfloat16) is None  # a kind the kernel does not form
    u, mean, rstd, w = torch.randn(2, 3, 8).bfloat16(), torch.randn(2, 3, 1), torch.rand(2, 3, 1), torch.randn(8)
    ops = regen_triton.operands("layernorm", (True, False), (u, mean, rstd, w), torch.bfloat16)
    assert ops.kind == "layernorm" and ops.tensors[3] is w and ops.tensors[4] is None
    assert ops.tensors[1].shape == (6,) and ops.tensors[0].shape == (6, 8)

    monkeypatch.delenv("LYCO_TRITON", raising=False)
    monkeypatch.setattr(regen_triton, "_CHECKED", {})
    monkeypatch.setattr(regen_triton, "_self_test", lambda dev, dt: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # a CPU torch cannot say

    def cuda(dtype):
        return regen_triton.Operands("mul", (SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda")),))
    assert regen_triton.usable(cuda(torch.bfloat16), 16)
    assert regen_triton.usable(cuda(torch.float16), regen_triton.MAX_RANK)
    assert not regen_triton.usable(cuda(torch.bfloat16), regen_triton.MAX_RANK + 1)
    assert not regen_triton.usable(cuda(torch.float32), 16)
    assert not regen_triton.usable(regen_triton.operands("mul", None, (a, b), torch.bfloat16), 16)  # CPU
    monkeypatch.setenv("LYCO_TRITON", "0")
    assert not regen_triton.usable(cuda(torch.bfloat16), 16)


@pytest.mark.parametrize("n,k,r", [(200, 96, 16), (78, 33, 5), (130, 70, 150)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("permuted", [False, True])
def test_layer_norm_operands_match_float64(kern, n, k, r, dtype, affine, permuted):
    """A layer norm's output formed in the kernel from its input and the mean and 1/σ torch's own layer norm kept
    (fp32 input: fp32 stats), against ``s·∂hᵀ·layer_norm(u)`` in float64; a rank over one block of 64 (150: three);
    the input as rows or as SD1.5's norm1 gets it — (batch, tokens, channels) of a channels-first tensor, no 2-D view."""
    g = torch.Generator().manual_seed(n + k + r)
    u = (torch.randn(n, k, generator=g) * 3 + 1.5).to(dtype)
    if permuted:
        u = u.view(2, n // 2, k).transpose(1, 2).contiguous().transpose(1, 2)  # strides (k·t, 1, t)
    w = torch.randn(k, generator=g).to(dtype) if affine else None
    b = torch.randn(k, generator=g).to(dtype) if affine else None
    y = torch.nn.functional.layer_norm(u.float().requires_grad_(), (k,), None if w is None else w.float(),
                                       None if b is None else b.float(), 1e-5)
    mean, rstd = y.grad_fn._saved_result1, y.grad_fn._saved_result2
    ops = kern.operands("layernorm", (affine, affine), (u, mean, rstd) + ((w, b) if affine else ()), dtype)
    assert ops.tensors[0].dim() == (3 if permuted else 2)
    gh = torch.randn(n, r, generator=g).to(dtype)
    ref = 0.625 * gh.double().t() @ torch.nn.functional.layer_norm(
        u.double(), (k,), None if w is None else w.double(), None if b is None else b.double(), 1e-5).reshape(n, k)
    got = kern.weight_grad(gh, ops, 0.625, torch.float32)
    # x rounded to bf16 in the kernel (the interpreter truncates): one ulp of x per element at most
    assert _rel(got, ref) < (2e-6 if dtype == torch.float32 else 2e-2)
    assert _rel(kern.weight_grad_torch(gh, ops, 0.625), ref) < (2e-6 if dtype == torch.float32 else 1e-2)

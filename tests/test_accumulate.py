"""``base.accumulate_conv1x1``: ``acc + α·conv1x1(h, w)`` as one batched GEMM — its value and gradients against float64
``F.conv2d``, and for one sample no batch sum in its backward (w a batch of one by a view, not an expand)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from lyco.algorithms.base import accumulate_conv1x1


def _nodes(t):
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.append(type(f).__name__)
        todo.extend(nf for nf, _ in f.next_functions)
    return names


@pytest.mark.parametrize("n", [1, 3])
def test_conv1x1_accumulate(n):
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(n, 6, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(n, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    out = accumulate_conv1x1(acc, h, w, alpha=0.7)
    ref = acc + 0.7 * F.conv2d(h, w)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (acc, h, w), gy)
    want = torch.autograd.grad(ref, (acc, h, w), gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    names = _nodes(out)
    assert "BaddbmmBackward0" in names  # the batched GEMM, not the conv fallback
    assert ("ExpandBackward0" in names) == (n > 1)


@pytest.mark.parametrize("n,alpha,gy_cl", [(1, 0.7, True), (1, 1.0, False), (3, 0.7, True), (2, 1.0, True)])
def test_conv1x1_accumulate_channels_last(n, alpha, gy_cl, monkeypatch):
    # a channels-last acc (the frozen conv's output on lyco.models.layout's channels-last weights): the output is
    # channels-last too, value and gradients as float64 F.conv2d's, whatever layout ∂y comes in; the conv fallback
    # (cuDNN's slow weight gradient on the GPU) is not taken
    monkeypatch.setenv("LYCO_ACC_CL", "1")
    g = torch.Generator().manual_seed(1)
    acc = torch.randn(n, 6, 4, 5, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    acc.requires_grad_(True)
    h = torch.randn(n, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    out = accumulate_conv1x1(acc, h, w, alpha=alpha)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    ref = acc.detach().contiguous().requires_grad_(True)
    want_out = ref + alpha * F.conv2d(h, w)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    gy = torch.randn(out.shape, generator=g, dtype=torch.float64)
    if gy_cl:
        gy = gy.contiguous(memory_format=torch.channels_last)
    got = torch.autograd.grad(out, (acc, h, w), gy)
    want = torch.autograd.grad(want_out, (ref, h, w), gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # ∂h and ∂w in the layouts of h and w (no copy for cuDNN's conv backward or autograd's accumulation)
    assert got[1].is_contiguous() and got[2].is_contiguous()
    names = _nodes(out)
    assert "ConvolutionBackward0" not in names and any("Conv1x1AccCL" in x for x in names)


def test_conv1x1_accumulate_channels_last_only_some_grads(monkeypatch):
    monkeypatch.setenv("LYCO_ACC_CL", "1")
    g = torch.Generator().manual_seed(2)
    acc = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    h = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
    w = torch.randn(4, 2, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    out = accumulate_conv1x1(acc, h, w, alpha=0.5)
    (gw,) = torch.autograd.grad(out.sum(), (w,))
    torch.testing.assert_close(gw, 0.5 * h.sum((0, 2, 3)).view(1, 2, 1, 1).expand(4, 2, 1, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode,in_step,taken", [("graph", False, False), ("graph", True, True), ("0", True, False),
                                                 ("1", False, True)])
def test_conv1x1_accumulate_channels_last_policy(mode, in_step, taken, monkeypatch):
    # LYCO_ACC_CL as every captured-steps path (graph_policy): off, the 1×1 conv and the add, with the same values
    from lyco.algorithms import graph_policy
    monkeypatch.setenv("LYCO_ACC_CL", mode)
    g = torch.Generator().manual_seed(3)
    acc = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    h = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    with graph_policy.graph_step() if in_step else contextlib.nullcontext():
        out = accumulate_conv1x1(acc, h, w, alpha=0.3)
    torch.testing.assert_close(out, acc + 0.3 * F.conv2d(h, w), rtol=1e-12, atol=1e-12)
    assert any("Conv1x1AccCL" in x for x in _nodes(out)) == taken

"""``base.accumulate_conv1x1``: ``acc + α·conv1x1(h, w)`` as one batched GEMM — its value and gradients against float64
``F.conv2d``, and for one sample no batch sum in its backward (w a batch of one by a view, not an expand)."""

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

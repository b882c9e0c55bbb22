"""The bypass op's conv forward with its epilogue (``algorithms/lowrank.py``: ``_conv_epilogue``, ``_conv_nhwc``;
``lowrank_triton.up_add``): the frozen conv without its bias, then ``y + s·U·h + b`` in one Triton pass — in place
on a 1×1 conv's NCHW output, or for a k×k conv from channels-last convs (the input converted once for both) into a
new NCHW output. Forced in on the CPU, where Triton's interpreter runs the kernel; every value against float64
math, the whole backward included (the backward does not change, but it now reads a channels-last h)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lyco.algorithms import lowrank, lowrank_triton
from lyco.algorithms.base import LayerSpec

CASES = {
    "3x3-nhwc": (nn.Conv2d(6, 5, 3, padding=1), True),
    "3x3-nchw": (nn.Conv2d(6, 5, 3, padding=1), False),
    "3x3-stride2-nhwc": (nn.Conv2d(6, 7, 3, stride=2, padding=1), True),
    "1x1": (nn.Conv2d(6, 9, 1), True),  # never channels-last: cuDNN runs 1×1 convs as GEMMs on NCHW
    "3x3-nobias-nhwc": (nn.Conv2d(6, 5, 3, padding=1, bias=False), True),
}


@pytest.mark.parametrize("wcl", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_epilogue_matches_float64(monkeypatch, triton_interpreter, case, wcl):
    """``wcl``: ``LYCO_CONV_WEIGHT_CL`` — the channels-last convs' weights (the frozen one and the down) by the same
    tiled copy instead of torch's inside the conv."""
    mod, nhwc = CASES[case]
    monkeypatch.setenv("LYCO_CONV_WEIGHT_CL", "1" if wcl else "0")
    calls = []
    real = lowrank_triton.up_add

    def spy(y3, u2, h3, s, bias=None, out=None):
        calls.append((y3.is_contiguous(), h3.is_contiguous(), bias is not None, out is y3))
        return real(y3, u2, h3, s, bias, out)
    monkeypatch.setattr(lowrank_triton, "up_add", spy)
    monkeypatch.setattr(lowrank, "_conv_epilogue", lambda x, spec: True)
    monkeypatch.setenv("LYCO_CONV_NHWC", "1" if nhwc else "0")
    real_cl = lowrank_triton.channels_last
    copies = []
    monkeypatch.setattr(lowrank_triton, "channels_last", lambda t: copies.append(tuple(t.shape)) or real_cl(t))
    r = 4
    g = torch.Generator().manual_seed(3)
    w = mod.weight.detach()
    b = None if mod.bias is None else (mod.bias.detach() + 0.5)  # a bias large enough to be seen
    k = tuple(w.shape[2:])
    down = (0.3 * torch.randn((r, w.shape[1]) + k, generator=g)).requires_grad_()
    up = (0.3 * torch.randn((w.shape[0], r, 1, 1), generator=g)).requires_grad_()
    x = torch.randn(2, 6, 9, 8, generator=g)
    xx = x.clone().requires_grad_()
    spec = LayerSpec.from_module(mod)
    y = lowrank.bypass_op(xx, spec, w, b, down, up, 0.7)
    assert y.is_contiguous()  # NCHW, as the frozen conv's output would be
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    # one pass per forward; k×k with NHWC: channels-last y and h in, a new output; else in place on NCHW
    chl = nhwc and k != (1, 1)
    assert calls == [(not chl, not chl, b is not None, not chl)]
    # x channels-last by one tiled copy (and with wcl the down's and the frozen weight's), the backward NCHW
    assert copies == (([tuple(x.shape)] + ([tuple(down.shape), tuple(w.shape)] if wcl else [])) if chl else [])
    xr, dr, ur = (t.detach().double().requires_grad_() for t in (x, down, up))
    kw = dict(stride=mod.stride, padding=mod.padding)
    yr = F.conv2d(xr, w.double(), None if b is None else b.double(), **kw) + 0.7 * F.conv2d(
        F.conv2d(xr, dr, None, **kw), ur)
    yr.backward(gy.double())
    for a, ref in ((y, yr), (xx.grad, xr.grad), (down.grad, dr.grad), (up.grad, ur.grad)):
        assert ((a.double() - ref).abs().max() / ref.abs().max()).item() < 2e-5


@pytest.mark.parametrize("policy, taken", [("0", False), ("1", True)])
def test_conv_epilogue_policy(monkeypatch, triton_interpreter, policy, taken):
    """``LYCO_CONV_EPILOGUE``: with the kernel's own conditions met (forced: the CPU has no CUDA) the policy alone
    decides whether the op's forward takes ``up_add`` — off, the bias stays in the conv and the up is ``baddbmm``;
    the output equals float64 math either way. A typo is an error naming the variable."""
    monkeypatch.setattr(lowrank_triton, "up_add_ok", lambda x, numel: True)
    monkeypatch.setenv("LYCO_CONV_NHWC", "0")
    calls = []
    real = lowrank_triton.up_add
    monkeypatch.setattr(lowrank_triton, "up_add", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("LYCO_CONV_EPILOGUE", policy)
    mod = nn.Conv2d(2, 3, 3, padding=1)
    spec = LayerSpec.from_module(mod)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2, 5, 5, generator=g, requires_grad=True)
    down = (0.3 * torch.randn(4, 2, 3, 3, generator=g)).requires_grad_()
    up = (0.3 * torch.randn(3, 4, 1, 1, generator=g)).requires_grad_()
    w, b = mod.weight.detach(), mod.bias.detach() + 0.5
    assert lowrank._conv_epilogue(x, spec) == taken
    y = lowrank.bypass_op(x, spec, w, b, down, up, 0.7)
    assert calls == ([1] if taken else [])
    ref = (F.conv2d(x.double(), w.double(), b.double(), padding=1)
           + 0.7 * F.conv2d(F.conv2d(x.double(), down.double(), padding=1), up.double()))
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 2e-5
    monkeypatch.setenv("LYCO_CONV_EPILOGUE", "often")
    with pytest.raises(ValueError, match="LYCO_CONV_EPILOGUE"):
        lowrank._conv_epilogue(x, spec)


def test_up_add_against_float64(triton_interpreter):
    """The kernels alone (and ``channels_last``'s copy): a channels-last source with a bias into a new NCHW result, in place on NCHW without one,
    ranks below, at and above the dot's 16-wide tile, a tile edge on both axes."""
    g = torch.Generator().manual_seed(4)
    for r in (3, 16, 40):
        u = torch.randn(70, r, generator=g)
        y4 = torch.randn(3, 70, 11, 13, generator=g)
        h4 = torch.randn(3, r, 11, 13, generator=g)
        b = torch.randn(70, generator=g)
        ref = y4.double().flatten(2) + 0.25 * torch.einsum("or,nrp->nop", u.double(), h4.double().flatten(2))
        got = lowrank_triton.up_add(y4.contiguous(memory_format=torch.channels_last).flatten(2), u,
                                    h4.contiguous(memory_format=torch.channels_last).flatten(2), 0.25, b)
        assert got.is_contiguous()
        assert (got.double() - ref - b.double()[:, None]).abs().max().item() < 1e-5
        cl = lowrank_triton.channels_last(y4)
        assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, y4)
    # conv weights: k² positions, fewer than the square tile's (the deep tile), ragged rows and several row tiles
    for shape in ((70, 300, 3, 3), (5, 6, 1, 1), (9, 40, 5, 5), (3, 17, 8, 9)):
        wt = torch.randn(shape, generator=g)
        cl = lowrank_triton.channels_last(wt)
        assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, wt), shape
        yi = y4.clone().flatten(2)
        assert lowrank_triton.up_add(yi, u, h4.flatten(2), 0.25, out=yi) is yi
        assert (yi.double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("nhwc", [True, False])
def test_conv_epilogue_with_a_grouped_down(monkeypatch, triton_interpreter, nhwc):
    """LoKr's grouped down (``groups`` = 2: B on each channel group of x, ``D = kron(I_2, B)`` never formed; its conv
    reads the NCHW x while the frozen conv reads the channels-last one) with the epilogue forced in, h 2·r = 72 channels
    wide (the kernel's rank loop takes two 64-wide steps): the op against float64 math with D formed."""
    monkeypatch.setattr(lowrank, "_conv_epilogue", lambda x, spec: True)
    monkeypatch.setenv("LYCO_CONV_NHWC", "1" if nhwc else "0")
    mod, g, r = nn.Conv2d(6, 5, 3, padding=1), 2, 36
    gen = torch.Generator().manual_seed(6)
    w, b = mod.weight.detach(), mod.bias.detach()
    down = (0.3 * torch.randn(r, 6 // g, 3, 3, generator=gen)).requires_grad_()
    up = (0.05 * torch.randn(5, g * r, generator=gen)).requires_grad_()  # LoKr's kron(W1, A): 2-D
    x = torch.randn(2, 6, 7, 6, generator=gen)
    xx = x.clone().requires_grad_()
    y = lowrank.bypass_op(xx, LayerSpec.from_module(mod), w, b, down, up, 0.7, groups=g)
    gy = torch.randn(y.shape, generator=gen)
    y.backward(gy)
    xr, dr, ur = (t.detach().double().requires_grad_() for t in (x, down, up))
    dfull = torch.zeros(g * r, 6, 3, 3, dtype=torch.float64)
    for i in range(g):
        dfull = dfull.index_put((torch.arange(i * r, (i + 1) * r)[:, None], torch.arange(i * 3, (i + 1) * 3)[None, :]),
                                dr)
    yr = F.conv2d(xr, w.double(), b.double(), padding=1) + 0.7 * F.conv2d(F.conv2d(xr, dfull, padding=1), ur.view(5, g * r, 1, 1))
    yr.backward(gy.double())
    for a, ref in ((y, yr), (xx.grad, xr.grad), (down.grad, dr.grad), (up.grad, ur.grad)):
        assert ((a.double() - ref).abs().max() / ref.abs().max()).item() < 2e-5


def _taps_forced(monkeypatch, nhwc: bool) -> list:
    """``LYCO_TAPS_DOWN`` forced in on the CPU (the epilogue and the kernels' conditions lifted; Triton's
    interpreter), the NHWC path as ``nhwc``; returns the list each ``tap_sum`` call appends its arguments to."""
    monkeypatch.setattr(lowrank, "_conv_epilogue", lambda x, spec: True)
    monkeypatch.setattr(lowrank_triton, "up_add_ok", lambda x, numel: True)
    monkeypatch.setenv("LYCO_CONV_NHWC", "1" if nhwc else "0")
    monkeypatch.setenv("LYCO_TAPS_DOWN", "1")
    calls = []
    real = lowrank_triton.tap_sum
    monkeypatch.setattr(lowrank_triton, "tap_sum", lambda *a: calls.append(a[1:]) or real(*a))
    return calls


@pytest.mark.parametrize("case", ["3x3-nhwc", "3x3-nobias-nhwc", "3x3-stride2-nhwc", "3x3-nchw", "1x1"])
def test_taps_down_in_the_op(monkeypatch, triton_interpreter, case):
    """``LYCO_TAPS_DOWN``: a stride-1 k×k conv adapter's down over the channels-last input as one GEMM of the
    per-tap products and ``lowrank_triton.tap_sum`` (forced in; Triton's interpreter) — taken only there (not at
    stride 2, not on the NCHW path, not for a 1×1 conv, which never goes channels-last); the op's output and every
    gradient against float64 math."""
    mod, nhwc = CASES[case]
    calls = _taps_forced(monkeypatch, nhwc)
    r, g = 4, torch.Generator().manual_seed(8)
    w = mod.weight.detach().double()
    b = None if mod.bias is None else mod.bias.detach().double() + 0.5
    down = (0.3 * torch.randn((r,) + tuple(w.shape[1:]), generator=g, dtype=torch.float64)).requires_grad_()
    up = (0.3 * torch.randn((w.shape[0], r, 1, 1), generator=g, dtype=torch.float64)).requires_grad_()
    x = torch.randn(2, 6, 9, 8, generator=g, dtype=torch.float64)
    xx = x.clone().requires_grad_()
    y = lowrank.bypass_op(xx, LayerSpec.from_module(mod), w, b, down, up, 0.7)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy)
    taken = nhwc and mod.stride == (1, 1) and mod.kernel_size != (1, 1)
    assert calls == ([(2, 9, 8, r, (3, 3), (1, 1), torch.float64, 1)] if taken else []), calls
    xr, dr, ur = (t.detach().clone().requires_grad_() for t in (x, down, up))
    kw = dict(stride=mod.stride, padding=mod.padding)
    yr = F.conv2d(xr, w, b, **kw) + 0.7 * F.conv2d(F.conv2d(xr, dr, None, **kw), ur)
    yr.backward(gy)
    for a, ref in ((y, yr), (xx.grad, xr.grad), (down.grad, dr.grad), (up.grad, ur.grad)):
        assert ((a - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_tap_sum_against_float64(triton_interpreter):
    """The tap sum alone, from per-tap products computed here: ragged positions (several blocks), kernels 3×3,
    1×3 and 5×5 with their paddings, ranks 1, 8 and 20; against torch's conv in float64."""
    g = torch.Generator().manual_seed(9)
    for (n, c, hh, ww), (r, kh, kw), pad in (((2, 7, 9, 13), (8, 3, 3), (1, 1)), ((1, 5, 5, 6), (20, 1, 3), (0, 1)),
                                             ((3, 4, 12, 11), (1, 3, 3), (1, 1)), ((2, 3, 7, 5), (4, 5, 5), (2, 2))):
        x = torch.randn(n, c, hh, ww, generator=g, dtype=torch.float64)
        d = torch.randn(r, c, kh, kw, generator=g, dtype=torch.float64)
        z = x.permute(0, 2, 3, 1).reshape(-1, c) @ d.permute(2, 3, 0, 1).reshape(-1, c).t()
        h = lowrank_triton.tap_sum(z.float(), n, hh, ww, r, (kh, kw), pad, torch.float32)
        ref = F.conv2d(x, d, padding=pad)
        assert h.shape == ref.shape and h.is_contiguous()
        assert ((h.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5, (x.shape, d.shape)
    # channel groups (one d on each, h group-major): z's rows are (position, group)
    x = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)
    d = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    z = x.permute(0, 2, 3, 1).reshape(-1, 2) @ d.permute(2, 3, 0, 1).reshape(-1, 2).t()
    h = lowrank_triton.tap_sum(z.float(), 2, 5, 7, 3, (3, 3), (1, 1), torch.float32, groups=3)
    ref = F.conv2d(x, d.repeat(3, 1, 1, 1), padding=1, groups=3)
    assert ((h.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


@pytest.mark.parametrize("nhwc, wide", [(True, True), (True, False), (False, True)])
def test_taps_down_with_a_grouped_down(monkeypatch, triton_interpreter, nhwc, wide):
    """LoKr's grouped down (``groups`` = 3: d on each channel group, ``D = kron(I_3, d)`` never formed) with
    ``LYCO_TAPS_DOWN`` forced in: over the channels-last x the groups are rows of one GEMM and h's channels come out
    group-major (one tap sum over the groups); on the NCHW path, and where z's row (3·9·4 = 108) exceeds
    ``_TAPS_GROUPED_WIDTH`` × x's 6 channels (``wide`` False: the rule as shipped), cuDNN's grouped form. Against
    float64 math with D formed, every gradient included."""
    if wide:
        monkeypatch.setattr(lowrank, "_TAPS_GROUPED_WIDTH", 1000)
    calls = _taps_forced(monkeypatch, nhwc)
    mod, g, r = nn.Conv2d(6, 5, 3, padding=1), 3, 4
    gen = torch.Generator().manual_seed(12)
    w, b = mod.weight.detach().double(), mod.bias.detach().double()
    down = (0.3 * torch.randn(r, 6 // g, 3, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    up = (0.05 * torch.randn(5, g * r, generator=gen, dtype=torch.float64)).requires_grad_()
    x = torch.randn(2, 6, 7, 6, generator=gen, dtype=torch.float64)
    xx = x.clone().requires_grad_()
    y = lowrank.bypass_op(xx, LayerSpec.from_module(mod), w, b, down, up, 0.7, groups=g)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(gy)
    assert calls == ([(2, 7, 6, r, (3, 3), (1, 1), torch.float64, g)] if nhwc and wide else []), calls
    xr, dr, ur = (t.detach().clone().requires_grad_() for t in (x, down, up))
    dfull = torch.zeros(g * r, 6, 3, 3, dtype=torch.float64)
    for i in range(g):
        dfull[i * r:(i + 1) * r, i * (6 // g):(i + 1) * (6 // g)] = dr
    yr = F.conv2d(xr, w, b, padding=1) + 0.7 * F.conv2d(F.conv2d(xr, dfull, padding=1), ur[:, :, None, None])
    yr.backward(gy)
    for a, ref in ((y, yr), (xx.grad, xr.grad), (down.grad, dr.grad), (up.grad, ur.grad)):
        assert ((a - ref).abs().max() / ref.abs().max()).item() < 1e-5

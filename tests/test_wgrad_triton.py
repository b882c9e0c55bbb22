"""A conv down's weight gradient in one Triton launch (``lyco.algorithms.wgrad_triton``, run in Triton's interpreter on
the CPU): against float64 autograd through ``F.conv2d`` — both forms, strides, dilation, padding, a rectangular kernel,
channels-last and grouped-batch views, K split over programs with the last program's sum — and the low-rank paths
that take it (LoCon's and LoKr's downs on the op and on the delta path) against the same steps with it off."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lyco
from lyco.algorithms import lowrank, wgrad_triton as W


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _reference(x, gh, kernel, stride, padding, dilation):
    kh, kw = W._pair(kernel)
    d = torch.zeros((gh.shape[1], x.shape[1], kh, kw), dtype=torch.float64, requires_grad=True)
    F.conv2d(x.double(), d, None, stride, padding, dilation).backward(gh.double())
    return d.grad


def _case(g, shape, r, kernel, stride, padding, dilation, layout="nchw", dtype=torch.float32):
    kh, kw = W._pair(kernel)
    (sy, sx), (py, px), (dy, dx) = W._pair(stride), W._pair(padding), W._pair(dilation)
    n, c, hh, ww = shape
    ho = (hh + 2 * py - dy * (kh - 1) - 1) // sy + 1
    wo = (ww + 2 * px - dx * (kw - 1) - 1) // sx + 1
    x = torch.randn(shape, generator=g).to(dtype)
    gh = torch.randn((n, r, ho, wo), generator=g).to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
        gh = gh.contiguous(memory_format=torch.channels_last)
    elif layout == "groups":  # LoKr's grouped down: (N, G·c) viewed as (N·G, c), ∂h likewise
        g2 = 2
        x = torch.randn((n // g2, g2 * c, hh, ww), generator=g).to(dtype).view(shape)
        gh = torch.randn((n // g2, g2 * r, ho, wo), generator=g).to(dtype).view(n, r, ho, wo)
    return x, gh


CASES = [  # (x shape, r, kernel, stride, padding, dilation)
    ((2, 12, 11, 9), 8, 3, 1, 1, 1),
    ((1, 10, 9, 9), 5, 3, 1, 0, 1),
    ((3, 8, 10, 8), 16, 3, 2, 1, 1),
    ((1, 9, 13, 11), 4, 3, 1, 2, 2),
    ((2, 6, 9, 7), 3, (3, 1), (1, 2), (1, 0), 1),
    ((4, 7, 8, 8), 16, 1, 1, 0, 1),
    ((2, 5, 7, 6), 6, 5, 1, 2, 1),
]
#: launch geometries: the default, and small tiles with many programs per multiprocessor — K split 1, 3, 5 … ways
GEOMS = {
    "default": None,
    "split": dict(W._CFG, BN=16, BK=16, per_sm=64, min_k_tiles=1, max_splits=5),
    "split7": dict(W._CFG, BN=16, BK=32, per_sm=64, min_k_tiles=1, max_splits=7),
}


@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("form", ["taps", "cols"])
@pytest.mark.parametrize("geom", sorted(GEOMS))
def test_conv_wgrad_matches_float64(case, form, geom):
    """∂D of ``conv2d(x, D)`` for ∂h, each form and geometry, against float64 autograd (fp32 products summed in
    fp32 in the interpreter: to 1e-5)."""
    shape, r, k, s, p, d = case
    x, gh = _case(torch.Generator().manual_seed(sum(shape) + r), shape, r, k, s, p, d)
    got = W.conv_wgrad(x, gh, k, s, p, d, torch.float32, cfg=GEOMS[geom], form=form)
    assert got.shape == (r, shape[1], *W._pair(k)) and got.dtype == torch.float32 and got.is_contiguous()
    assert _rel(got, _reference(x, gh, k, s, p, d)) < 1e-5


@pytest.mark.parametrize("layout", ["cl", "groups"])
@pytest.mark.parametrize("form", ["taps", "cols"])
def test_conv_wgrad_reads_strided_operands(layout, form):
    """x and ∂h read in place as they come: channels-last, and the view of a grouped down (groups in the batch)."""
    shape, r = (4, 6, 9, 8), 5
    x, gh = _case(torch.Generator().manual_seed(5), shape, r, 3, 1, 1, 1, layout)
    assert not x.is_contiguous() or layout == "groups"
    got = W.conv_wgrad(x, gh, 3, 1, 1, 1, torch.float32, cfg=GEOMS["split"], form=form)
    assert _rel(got, _reference(x, gh, 3, 1, 1, 1)) < 1e-5


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_conv_wgrad_bf16_operands_scale_and_dtype(out_dtype):
    """bf16 x and ∂h: every product summed before one rounding into ``dtype`` (the float64 sum of the bf16 values
    rounded once), ``scale`` applied to the sum; ∂h's dtype where no dtype is given."""
    shape, r = (2, 12, 10, 10), 8
    x, gh = _case(torch.Generator().manual_seed(9), shape, r, 3, 1, 1, 1, dtype=torch.bfloat16)
    want = 0.37 * _reference(x, gh, 3, 1, 1, 1)
    got = W.conv_wgrad(x, gh, 3, 1, 1, 1, out_dtype, scale=0.37, cfg=GEOMS["split"])
    assert got.dtype == out_dtype
    assert _rel(got, want) < (1e-2 if out_dtype == torch.bfloat16 else 1e-5)
    assert W.conv_wgrad(x, gh, 3, 1, 1, 1).dtype == torch.bfloat16


def test_split_counters_come_back_zero_and_results_repeat(monkeypatch):
    """A split launch's counters are zero again after it (the next launch — a graph replay — needs no memset), the ring
    wraps, and two launches give bit-identical ∂D (the partials summed in split order, not in arrival order)."""
    monkeypatch.setattr(W, "_RINGS", {})
    monkeypatch.setattr(W, "_RING", 40)
    shape, r = (2, 12, 11, 9), 8
    x, gh = _case(torch.Generator().manual_seed(1), shape, r, 3, 1, 1, 1)
    cfg = GEOMS["split"]
    first = W.conv_wgrad(x, gh, 3, 1, 1, 1, torch.float32, cfg=cfg)
    ring = W._RINGS[x.device]
    assert ring[1] == 9  # one 16-channel tile of the 12 channels × 9 taps: a counter each
    for _ in range(6):  # past the ring's end: it starts again from zero
        again = W.conv_wgrad(x, gh, 3, 1, 1, 1, torch.float32, cfg=cfg)
        assert torch.equal(again, first)
    assert ring[1] == 3 * 9  # 4 launches fit in 40 counters; the 5th, 6th and 7th after the wrap
    assert ring[0].shape == (40,) and int(ring[0].abs().sum()) == 0


def test_form_rule(monkeypatch):
    """:func:`wgrad_triton.form`: none for a 1×1 down of one image (of a batch: past a quarter of the work bound), a
    rank past ``MAX_RANK``, a ∂D past ``LYCO_WGRAD_MAX_WORK`` (channels × the batch's output positions × taps) or more
    than ``MAX_POSITIONS`` per program of its launch; the gathered columns for stride 2; the taps form else."""
    monkeypatch.delenv("LYCO_WGRAD_MAX_WORK", raising=False)
    assert W.form((1, 320, 64, 64), 16, (1, 1)) is None  # one image: one GEMM on the torch path
    assert W.form((8, 40, 64, 64), 16, (1, 1)) == "taps"  # LoKr's groups: a batched GEMM and its sum there
    assert W.form((64, 40, 64, 64), 16, (1, 1)) is None  # 10.5 M > 20 M / 4
    assert W.form((1, 320, 64, 64), 8, (3, 3), 1, 1) == "taps"
    assert W.form((1, 960, 64, 64), 8, (3, 3), 1, 1) is None  # 35 M > 20 M
    assert W.form((1, 640, 64, 64), 8, (3, 3), 1, 1) is None  # 23.6 M
    assert W.form((1, 1920, 32, 32), 8, (3, 3), 1, 1) == "taps"  # 17.7 M
    assert W.form((8, 40, 64, 64), 16, (3, 3), 1, 1) == "taps"  # LoKr's groups: 11.8 M, 2304 positions a program
    assert W.form((64, 20, 32, 32), 16, (3, 3), 1, 1) is None  # 5.9 M, but 4096 positions a program
    assert W.form((64, 80, 32, 32), 16, (1, 1)) is None  # 5.2 M, 4096 positions a program
    assert W.form((64, 160, 8, 8), 16, (3, 3), 1, 1) == "taps"  # 1408
    assert W.form((1, 640, 32, 32), 8, (3, 3), 2, 1) == "cols"
    assert W.form((1, 64, 8, 8), W.MAX_RANK + 1, (3, 3), 1, 1) is None
    assert W.form((1, 64, 8, 8), 8, (3, 3), 1, "same") is None
    monkeypatch.setenv("LYCO_WGRAD_MAX_WORK", "1000")
    assert W.form((1, 64, 8, 8), 8, (3, 3), 1, 1) is None
    assert W.form((1, 10, 4, 2), 8, (3, 3), 1, 1) == "taps"  # 10·8·9 = 720
    monkeypatch.setenv("LYCO_WGRAD_MAX_WORK", "-1")
    with pytest.raises(ValueError, match="LYCO_WGRAD_MAX_WORK"):
        W.form((1, 64, 8, 8), 8, (3, 3), 1, 1)


@pytest.fixture()
def kernel_on_cpu(monkeypatch):
    """The kernel taken on CPU tensors (its device and dtype conditions and self-test passed), counting its calls."""
    monkeypatch.setattr(W, "enabled", lambda t, dtype=None: True)
    monkeypatch.setattr(W, "gate", lambda *a: True)
    calls = []
    real = W.conv_wgrad
    monkeypatch.setattr(W, "conv_wgrad", lambda *a, **k: calls.append(k.get("form")) or real(*a, **k))
    return calls


@pytest.mark.parametrize("algo", ["locon", "lokr"])
@pytest.mark.parametrize("op", ["1", "0"])
@pytest.mark.parametrize("stride", [1, 2])
def test_lowrank_paths_take_the_kernel(monkeypatch, kernel_on_cpu, algo, op, stride):
    """LoCon's down and LoKr's grouped low-rank W2 on a 3×3 conv, on the bypass op (``LYCO_BYPASS_OP=1``) and on the
    delta path: with ``LYCO_WGRAD_KERNEL=1`` ∂D comes from the kernel (its calls counted; the form the rule gives for
    the stride) and every gradient — x's and the factors' — equals the step with it off within fp32's rounding."""
    monkeypatch.setenv("LYCO_BYPASS_OP", op)
    monkeypatch.setenv("LYCO_CONV_DOWN_IM2COL", "1")
    g = torch.Generator().manual_seed(11 + stride)
    model = nn.Sequential(nn.Conv2d(64, 32, kernel_size=3, padding=1, stride=stride))  # LoKr: W2 low-rank (8 × 144)
    kw = (dict(algo="lokr", rank=4, alpha=3.0, conv_rank=4, conv_alpha=3.0, factor=4) if algo == "lokr"
          else dict(algo="lora", rank=4, alpha=3.0, conv_rank=4, conv_alpha=3.0))
    net = lyco.create(model, preset="full", seed=0, **kw)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randn(2, 64, 10, 9, generator=g, requires_grad=True)
    params = [x] + list(net.trainable_parameters())
    out = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("LYCO_WGRAD_KERNEL", mode)
        kernel_on_cpu.clear()
        y = model(x)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        out[mode] = (y, torch.autograd.grad(y, params, gy))
        assert kernel_on_cpu == ([] if mode == "0" else ["taps" if stride == 1 else "cols"])
    torch.testing.assert_close(out["1"][0], out["0"][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(out["1"][1], out["0"][1]):
        assert a.shape == b.shape and _rel(a, b) < 1e-5

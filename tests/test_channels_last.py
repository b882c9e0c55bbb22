"""A model whose conv weights are channels-last (``model.to(memory_format=torch.channels_last)``, as diffusers'
docs suggest for speed, or frozen weights kept that way) trains the same adapters: every algorithm, on every path
(what ``mode = "auto"`` picks, the delta path, the rebuilt op), gives the output and the gradients of the same
model in the default layout — in float64, within rounding. Session 37: LoKr's rebuilt conv raised on such a
weight (its merge viewed W as (out_l, out_k, in_m, in_n·∏k), which a channels-last weight is not)."""

import pytest
import torch

from test_fast_paths import CONFIGS, _inputs, _make, _run


def _channels_last(model):
    model.to(memory_format=torch.channels_last)
    conv = model.conv.weight
    assert not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mode", ["auto", "bypass", "rebuild"])
def test_channels_last_weights_train_the_same(name, mode, monkeypatch):
    ref_model, ref_net = _make(CONFIGS[name])
    model, net = _make(CONFIGS[name])
    _channels_last(model)
    inputs = _inputs()
    cl_inputs = (inputs[0].contiguous(memory_format=torch.channels_last), inputs[1])
    got = _run(model, net, cl_inputs, mode=None if mode == "auto" else mode)
    # the reference: the plain y + Σ m·Δy sum (test_fast_paths checks it against the fast paths) on the default layout
    ref = _run(ref_model, ref_net, inputs, reference=True, monkeypatch=monkeypatch)
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert len(got[3]) == len(ref[3]) > 0
    for a, b in zip(got[3], ref[3]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # training leaves the channels-last base weight's values as the default layout's (no path wrote into it)
    assert torch.equal(model.conv.weight, ref_model.conv.weight)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_channels_last_weights_merge_and_unmerge(name):
    """``merge`` writes W + ΔW into a channels-last weight in place (its layout kept) with the values the default
    layout gets; ``unmerge`` gives the weights back."""
    ref_model, ref_net = _make(CONFIGS[name])
    model, net = _make(CONFIGS[name])
    _channels_last(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref_net.merge()
    net.merge()
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref_model.state_dict()[k], rtol=1e-12, atol=1e-12)
    net.unmerge()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-12, atol=1e-12)


def _convs():
    m = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.Conv2d(32, 4, 3, padding=1),
                            torch.nn.Conv2d(4, 4, 1))
    m.requires_grad_(False)
    return m


def test_layout_rule_first_forward_only():
    """:func:`lyco.models.layout.frozen_conv_weights_channels_last`: at the first forward a k×k weight with at least
    as many elements as its input becomes channels-last (values unchanged), a smaller one stays, a 1×1 conv is not
    hooked; the hooks are gone after it, so a later input of another size changes nothing."""
    from lyco.models import layout
    m = _convs()
    m[1].weight.requires_grad_(True)  # trained: left alone whatever its size
    ref = [c.weight.detach().clone() for c in m]
    lay = layout.frozen_conv_weights_channels_last(m)
    assert lay.pending == 1  # the frozen k×k conv; neither the trained one nor the 1×1 is hooked
    x = torch.randn(1, 16, 4, 4)  # 256 input elements against 4608 in the first weight
    y_ref = torch.nn.functional.conv2d(x, ref[0], m[0].bias, padding=1)
    m(x)
    assert lay.converted == ["0"] and lay.kept == [] and lay.pending == 0
    assert m[0].weight.is_contiguous(memory_format=torch.channels_last) and not m[0].weight.is_contiguous()
    assert m[1].weight.is_contiguous() and m[2].weight.is_contiguous()
    assert all(torch.equal(c.weight, r) for c, r in zip(m, ref))
    torch.testing.assert_close(m[0](x), y_ref, rtol=1e-6, atol=1e-6)
    m2 = _convs()
    lay2 = layout.frozen_conv_weights_channels_last(m2)
    m2(torch.randn(8, 16, 32, 32))  # inputs larger than every weight: nothing converted
    assert lay2.converted == [] and sorted(lay2.kept) == ["0", "1"]
    m(torch.randn(8, 16, 32, 32))
    assert m[0].weight.is_contiguous(memory_format=torch.channels_last)  # decided once, at the first forward


def test_layout_hook_in_a_capture_converts_nothing(monkeypatch):
    """A first forward reached inside a CUDA graph capture leaves the weight as it is (the captured graph would read
    a freed weight) and drops its hook."""
    from lyco.models import layout
    monkeypatch.setattr(layout, "_capturing", lambda w: True)
    m = _convs()
    lay = layout.frozen_conv_weights_channels_last(m)
    m(torch.randn(1, 16, 4, 4))
    assert lay.converted == [] and sorted(lay.skipped_in_capture) == ["0", "1"] and lay.pending == 0
    assert m[0].weight.is_contiguous()


@pytest.mark.parametrize("m", [1.0, 0.7])
@pytest.mark.parametrize("form", ["low-rank W2", "full W2"])
def test_lokr_grouped_merge_walks_a_channels_last_weights_taps(monkeypatch, triton_interpreter, m, form):
    """LoKr's grouped down on the bypass op — ``kron(I, B)`` with a low-rank W2, W2 itself on each channel group
    with a full one (the ``eye`` form, up ``kron(W1, I)``) —: its ∂x's merged weight built from a channels-last W by
    :func:`lowrank_triton.add_lowrank_taps` (forced in on the CPU, interpreted; fp32 inside), W′ channels-last —
    outputs and gradients (x and the factors) equal float64 math on the dense ``kron`` and the NCHW weight. Session
    38: the merge copied a channels-last W to NCHW first (``reshape``), and cuDNN converted W′ back in the dgrad."""
    from test_bypass_op import _adapter_tensors, _dense_lokr_full, _reference, _run, _setup
    from lyco.algorithms import lowrank, lowrank_triton
    from lyco.algorithms.lokr import LoKr
    for var in ("LYCO_BYPASS_OP", "LYCO_MERGE_KERNEL", "LYCO_MERGE_TAPS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(LoKr, "WGRAD_PER_H", 0.0)  # the op, not the rebuilt op, at this width
    monkeypatch.setattr(LoKr, "EYE_POSITIONS", 1e9)  # a full W2 on the op too
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    monkeypatch.setattr(lowrank_triton, "usable", lambda w, rank: True)
    built = []
    real = lowrank_triton.add_lowrank_taps
    monkeypatch.setattr(lowrank_triton, "add_lowrank_taps", lambda *a: built.append(real(*a)) or built[-1])
    torch.manual_seed(0)
    mod = torch.nn.Conv2d(32, 48, 3, padding=1)
    cfg = dict(algo="lokr", rank=2, factor=4)
    cfg.update(full_matrix=True) if form == "full W2" else cfg.update(alpha=1.5)
    model, net = _setup(mod, cfg)
    net.set_multiplier(m)
    model.to(memory_format=torch.channels_last)
    assert mod.weight.is_contiguous(memory_format=torch.channels_last) and not mod.weight.is_contiguous()
    x = torch.randn(2, 32, 9, 7, dtype=torch.float64, requires_grad=True)
    gy = torch.randn_like(model(x).detach())
    built.clear()
    y, grads, node = _run(model, x, gy)
    assert node == "_BypassOpBackward"
    assert len(built) == 1 and built[0].is_contiguous(memory_format=torch.channels_last)
    if form == "full W2":
        _, t = _adapter_tensors(mod)
        leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in t.items()}
        xr = x.detach().clone().requires_grad_()
        w = mod.weight.detach() + m * _dense_lokr_full(leaves).reshape(mod.weight.shape)
        yr = torch.nn.functional.conv2d(xr, w, mod.bias, padding=1)
        gr = torch.autograd.grad(yr, [xr] + [leaves[k] for k, v in t.items() if v.requires_grad], gy)
    else:
        yr, gr = _reference(mod, "lokr", x, gy, m)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)  # the forward never merges here
    assert len(grads) == len(gr) >= 3
    for g, r in zip(grads, gr):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)  # ∂x through the kernel's fp32 W′


def test_a_weight_the_layout_kept_nchw_keeps_its_merged_weight_nchw(monkeypatch):
    """A frozen weight the rule kept NCHW is marked (``lowrank.KEPT_NCHW``), and the op's ∂x then runs on an NCHW merged
    weight where the dgrad's channels-last rule (``LYCO_DGRAD_WEIGHT_CL``) would otherwise copy it channels-last: its
    neighbours run NCHW. A converted weight and an unmarked one of the same shape are left to that rule (run 276–277:
    LoCon at SD1.5 b1 on the layout 0.10–0.12 ms faster with it off)."""
    from lyco.algorithms import lowrank
    from lyco.algorithms.base import LayerSpec
    from lyco.models import layout
    monkeypatch.setenv("LYCO_DGRAD_WEIGHT_CL", "1")
    m = _convs()
    lay = layout.frozen_conv_weights_channels_last(m)
    x = torch.randn(1, 16, 12, 12)  # 2304 input elements: the 16 → 32 weight (4608) converted, 32 → 4 (1152) kept
    m(x)
    assert lay.converted == ["0"] and lay.kept == ["1"]
    assert getattr(m[1].weight, lowrank.KEPT_NCHW, False) and not getattr(m[0].weight, lowrank.KEPT_NCHW, False)
    spec = LayerSpec.from_module(m[1])
    shape = (1, 32, 12, 12)  # 144 positions ≤ 32·9: the shape rule alone says channels-last
    assert lowrank._dgrad_cl(spec, shape) and lowrank._dgrad_cl(spec, shape, weight=torch.empty_like(m[1].weight))
    assert not lowrank._dgrad_cl(spec, shape, weight=m[1].weight)

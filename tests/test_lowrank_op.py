"""``lyco.algorithms.lowrank``: the rebuild path's op for low-rank deltas, ``op(x, W + s·U·D, b)`` with a
factored backward (LoRA/LoCon and LoHa's Khatri–Rao form under ``mode = "rebuild"``).

Reference: dense float64 math written here — ``op(x, W + s·U·D)`` with autograd through the dense
expression — never the op's own code.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lyco
from lyco.algorithms import lowrank
from lyco.algorithms.base import LayerSpec

_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _took_op(y):
    """Whether ``y`` came out of the low-rank op (through the views that flatten a linear's input)."""
    f = y.grad_fn
    while f is not None and type(f).__name__ in ("ViewBackward0", "UnsafeViewBackward0"):
        f = f.next_functions[0][0]
    return f is not None and "LowRankOp" in type(f).__name__


def _dense(x, mod, w, b, down, up, s):
    """op(x, W + s·U·D, b) in plain autograd (the definition of the low-rank delta)."""
    dw = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape)
    if isinstance(mod, nn.Linear):
        return F.linear(x, w + s * dw, b)
    return _FN[w.dim() - 2](x, w + s * dw, b, mod.stride, mod.padding, mod.dilation)


CASES = [
    ("linear-2d", lambda: nn.Linear(6, 5), (7, 6)),
    ("linear-3d", lambda: nn.Linear(6, 5, bias=False), (2, 3, 6)),
    ("linear-1d", lambda: nn.Linear(6, 5), (6,)),
    ("conv1d", lambda: nn.Conv1d(6, 4, 3, stride=2, padding=2, dilation=2), (2, 6, 11)),
    ("conv2d", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 6)),
    ("conv2d-1x1", lambda: nn.Conv2d(4, 6, 1, bias=False), (2, 4, 3, 3)),
    ("conv2d-3x5-s1", lambda: nn.Conv2d(4, 6, (3, 5), padding=(0, 2)), (2, 4, 7, 6)),  # ∂D by the im2col of ∂h
    ("conv3d", lambda: nn.Conv3d(4, 6, 3, padding=(1, 0, 2)), (1, 4, 3, 4, 5)),
]


@pytest.mark.parametrize("trainable_base", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_lowrank_op_equals_dense_definition(case, trainable_base):
    _, make, xshape = case
    torch.manual_seed(0)
    mod = make().double()
    spec = LayerSpec.from_module(mod)
    r = 3
    kshape = tuple(mod.weight.shape[2:])
    down = torch.randn((r, spec.in_dim) + kshape, dtype=torch.float64, requires_grad=True)
    up = torch.randn((spec.out_dim, r) + (1,) * len(kshape), dtype=torch.float64, requires_grad=True)
    w = mod.weight.detach().clone().requires_grad_(trainable_base)
    b = None if mod.bias is None else mod.bias.detach().clone().requires_grad_(trainable_base)
    x = torch.randn(xshape, dtype=torch.float64, requires_grad=True)
    s = 0.35
    y = lowrank.lowrank_op(x, spec, w, b, down, up, s)
    assert y is not None and _took_op(y)
    ref = _dense(x, mod, w, b, down, up, s)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    leaves = [x, down, up] + ([w] + ([b] if b is not None else []) if trainable_base else [])
    for got, want in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(ref, leaves, gy)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_lowrank_op_declines_what_it_does_not_handle():
    """Grouped convs, padding modes, string padding: None (the generic rebuilt op takes them)."""
    cases = [nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
             nn.Conv2d(4, 6, 3, padding="same")]
    for mod in cases:
        spec = LayerSpec.from_module(mod)
        down = torch.randn((2, spec.in_dim) + spec.kernel)
        up = torch.randn(spec.out_dim, 2, 1, 1)
        assert lowrank.lowrank_op(torch.randn(1, 4, 5, 5), spec, mod.weight, mod.bias, down, up, 1.0) is None


def _one_layer_net(layer, cfg, seed=0, mode="rebuild"):
    model = nn.Sequential(layer).double()
    net = lyco.create(model, preset="full", seed=seed, mode=mode, **cfg)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model, net


@pytest.mark.parametrize("cfg", [dict(algo="lora", rank=3, alpha=2.0), dict(algo="lora", rank=2, use_scalar=True),
                                 dict(algo="loha", rank=2, alpha=1.0)], ids=["lora", "lora-scalar", "loha"])
@pytest.mark.parametrize("layer", [lambda: nn.Linear(16, 12), lambda: nn.Conv2d(6, 8, 3, padding=1)],
                         ids=["linear", "conv"])
def test_rebuild_mode_takes_the_op_and_equals_the_dense_merge(cfg, layer):
    """Under ``mode = "rebuild"`` a LoRA / LoHa layer's output comes from the op (its grad_fn), and
    outputs and gradients equal ``op(x, W + m·ΔW)`` with ΔW from the algorithm's ``delta_weight``
    (fp64, multiplier 0.6); ``mode = "auto"`` keeps these algorithms on the delta path."""
    model, net = _one_layer_net(layer(), cfg)
    net.set_multiplier(0.6)
    mod = model[0]
    x = torch.randn((4, 16) if isinstance(mod, nn.Linear) else (2, 6, 5, 5), dtype=torch.float64,
                    requires_grad=True)
    y = model(x)
    assert _took_op(y)
    (adapter,) = net.layers.values()
    params = list(adapter.params.values())
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x] + params, gy)
    leaves = {k: p for k, p in adapter.params.items()}
    t = dict(adapter.tensors())
    t.update(leaves)
    dw = adapter.algorithm.delta_weight(t, adapter.spec)
    if isinstance(mod, nn.Linear):
        ref = F.linear(x, mod.weight + 0.6 * dw, mod.bias)
    else:
        ref = F.conv2d(x, mod.weight + 0.6 * dw, mod.bias, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, torch.autograd.grad(ref, [x] + params, gy)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    adapter.mode = "auto"
    assert not _took_op(model(x))


def test_not_taken_for_tucker_two_adapters_or_dylora_training():
    """Tucker LoCon and a second adapter on the layer take other paths; DyLoRA in training too."""
    def op_taken(model, x):
        return _took_op(model(x))

    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    model, net = _one_layer_net(nn.Conv2d(6, 8, 3, padding=1), dict(algo="lora", rank=2))
    assert op_taken(model, x)
    model, net = _one_layer_net(nn.Conv2d(6, 8, 3, padding=1), dict(algo="dylora", rank=4, block_size=2))
    net.train()
    assert not op_taken(model, x)
    net.eval()
    assert op_taken(model, x)
    model, net = _one_layer_net(nn.Conv2d(6, 8, 3, padding=1), dict(algo="lora", rank=2, use_tucker=True))
    assert not op_taken(model, x)
    model, net = _one_layer_net(nn.Conv2d(6, 8, 3, padding=1), dict(algo="lora", rank=2))
    lyco.create(model, preset="full", seed=1, algo="lora", rank=2, mode="rebuild")
    assert not op_taken(model, x)


def test_only_the_input_is_kept():
    """The op keeps x and the parameters — not the output, not ``h = D∗x``, not the merged weight."""
    model, net = _one_layer_net(nn.Linear(64, 48), dict(algo="lora", rank=4))
    x = torch.randn(128, 64, dtype=torch.float64, requires_grad=True)
    keep = {p.data_ptr() for p in model.parameters()} | {p.data_ptr() for p in net.trainable_parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    assert _took_op(y)
    others = [tuple(t.shape) for t in saved if t.data_ptr() not in keep | {x.data_ptr()}]
    assert others == []
    assert x.data_ptr() in {t.data_ptr() for t in saved}


def test_channels_last_conv_input():
    """A channels-last activation gives the same result and input gradient."""
    model, net = _one_layer_net(nn.Conv2d(6, 8, 3, padding=1), dict(algo="lora", rank=2))
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    xs = [x.clone().requires_grad_(True), x.clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)]
    outs = [model(v) for v in xs]
    assert all(_took_op(o) for o in outs)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for o in outs:
        o.square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-12, atol=1e-12)


def test_bf16_model_close_to_fp64_definition():
    """A bf16 layer and adapter: output and gradients within bf16 rounding of the fp64 definition."""
    torch.manual_seed(0)
    mod = nn.Linear(64, 48)
    spec = LayerSpec.from_module(mod)
    down, up = torch.randn(4, 64) * 0.2, torch.randn(48, 4) * 0.2
    x = torch.randn(32, 64)
    gy = torch.randn(32, 48)
    res = []
    for dt in (torch.bfloat16, torch.float64):
        leaves = [v.to(dt).requires_grad_(True) for v in (x, down, up)]
        w, b = mod.weight.detach().to(dt), mod.bias.detach().to(dt)
        y = (lowrank.lowrank_op(leaves[0], spec, w, b, leaves[1], leaves[2], 0.5) if dt == torch.bfloat16
             else _dense(leaves[0], mod, w, b, leaves[1], leaves[2], 0.5))
        res.append([y] + list(torch.autograd.grad(y, leaves, gy.to(dt))))
    for a, b in zip(*res):
        assert float((a.double() - b).detach().norm() / b.detach().norm()) < 1.5e-2

"""(IA)³ against dense float64 references and LyCORIS 4.1.3 (merge semantics; its bypass bias bug)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from lycoris.modules.ia3 import IA3Module

from lyco.algorithms import detect, get
from lyco.algorithms.base import LayerSpec, layer_op

M = 0.7


def _layer(case: str) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    layer, shape = {
        "linear_bias": (nn.Linear(6, 8), (3, 5, 6)),
        "linear_nobias": (nn.Linear(6, 8, bias=False), (4, 6)),
        "conv1d": (nn.Conv1d(3, 8, 3, padding=1), (2, 3, 7)),
        "conv2d_1x1": (nn.Conv2d(4, 8, 1), (2, 4, 5, 5)),
        "conv2d_3x3": (nn.Conv2d(3, 8, 3, stride=2, padding=1), (2, 3, 7, 7)),
        "conv2d_groups": (nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5)),
        "conv3d": (nn.Conv3d(2, 8, 3, padding=1), (1, 2, 4, 4, 4)),
    }[case]
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer, torch.randn(shape, generator=g)


CASES = ["linear_bias", "linear_nobias", "conv1d", "conv2d_1x1", "conv2d_3x3", "conv2d_groups", "conv3d"]


def _random(spec, on_input, seed):
    alg = get("ia3")
    t = alg.create(spec, alg.validate_options({"train_on_input": on_input}))
    t["weight"] = torch.randn(t["weight"].shape, generator=torch.Generator().manual_seed(seed))
    return t


def ref_delta(w, vec, on_input, groups=1):
    """ΔW[o, i, …] = W[o, i, …]·w[o]  (or ·w[input channel of column i in row o's group])."""
    w = w.double()
    vec = vec.double().reshape(-1)
    out, cols = w.shape[0], w.shape[1]
    d = torch.empty_like(w)
    for o in range(out):
        for i in range(cols):
            if on_input:
                group = o // (out // groups)
                d[o, i] = w[o, i] * vec[group * cols + i]
            else:
                d[o, i] = w[o, i] * vec[o]
    return d


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_dense_and_forward(case, on_input):
    layer, x = _layer(case)
    layer, x = layer.double(), x.double()
    spec = LayerSpec.from_module(layer)
    alg = get("ia3")
    t = {k: (v.double() if v.is_floating_point() else v) for k, v in _random(spec, on_input, 1).items()}
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    ref = ref_delta(w, t["weight"], on_input, spec.groups)
    torch.testing.assert_close(alg.delta_weight(t, spec, w), ref, rtol=1e-12, atol=1e-12)
    w2, b2 = alg.merged(t, spec, w, b, M)
    torch.testing.assert_close(w2, w + M * ref, rtol=1e-12, atol=1e-12)
    assert b2 is b  # the bias is not scaled
    base = layer(x)
    got = base + M * alg.forward_delta(x, t, spec, w, b, base)
    torch.testing.assert_close(got, layer_op(x, spec, w2, b2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ["linear_bias", "conv2d_3x3", "conv3d"])
def test_both_weight_shapes_are_read(case):
    layer, _ = _layer(case)
    spec = LayerSpec.from_module(layer)
    alg = get("ia3")
    w = layer.weight.detach()
    for on_input in (False, True):
        t = _random(spec, on_input, 2)
        c = t["weight"].numel()
        other = (1, c) + (1,) * (w.dim() - 2) if t["weight"].dim() == 1 else (c,)
        t2 = dict(t, weight=t["weight"].reshape(other))
        torch.testing.assert_close(alg.delta_weight(t2, spec, w), alg.delta_weight(t, spec, w), rtol=0, atol=0)


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_gradients(on_input):
    layer, x = _layer("conv2d_3x3")
    spec = LayerSpec.from_module(layer)
    alg = get("ia3")
    t = _random(spec, on_input, 3)
    assert [k for k in t if k not in alg.frozen_keys] == ["weight"]
    t["weight"].requires_grad_(True)
    base = layer(x).detach()
    g = torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    (alg.forward_delta(x, t, spec, layer.weight.detach(), layer.bias.detach(), base) * g).sum().backward()
    assert t["weight"].grad is not None and t["weight"].grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# LyCORIS 4.1.3
# ---------------------------------------------------------------------------------------

def _lyco(layer, t, on_input, multiplier, bypass):
    mod = IA3Module("m", layer, multiplier, train_on_input=on_input, bypass_mode=bypass)
    with torch.no_grad():
        mod.weight.copy_(t["weight"])
    return mod


@pytest.mark.parametrize("case", ["linear_bias", "linear_nobias", "conv1d", "conv2d_3x3", "conv3d"])
@pytest.mark.parametrize("on_input", [False, True])
def test_merge_matches_lycoris(case, on_input):
    layer, x = _layer(case)
    spec = LayerSpec.from_module(layer)
    alg = get("ia3")
    t = _random(spec, on_input, 4)
    assert t["weight"].shape == _lyco(layer, t, on_input, M, False).weight.shape  # same layout
    mod = _lyco(layer, t, on_input, M, False)
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    with torch.no_grad():
        torch.testing.assert_close(alg.merged(t, spec, w, b, M)[0], mod.get_merged_weight(multiplier=M)[0],
                                   rtol=1e-6, atol=1e-6)
        base = layer(x)
        ours = base + M * alg.forward_delta(x, t, spec, w, b, base)
        torch.testing.assert_close(ours, mod(x), rtol=1e-5, atol=1e-5)  # its rebuild forward
        if on_input or b is None:  # here its bypass agrees too
            torch.testing.assert_close(ours, _lyco(layer, t, on_input, M, True)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["linear_bias", "conv2d_3x3"])
def test_lycoris_bypass_scales_bias_we_follow_merge(case):
    layer, x = _layer(case)
    spec = LayerSpec.from_module(layer)
    alg = get("ia3")
    t = _random(spec, False, 5)
    w, b = layer.weight.detach(), layer.bias.detach()
    with torch.no_grad():
        base = layer(x)
        ours = base + M * alg.forward_delta(x, t, spec, w, b, base)
        merged = layer_op(x, spec, *alg.merged(t, spec, w, b, M))
        ly_bypass = _lyco(layer, t, False, M, True)(x)
    torch.testing.assert_close(ours, merged, rtol=1e-5, atol=1e-5)
    # LyCORIS's bypass is off by exactly m·w⊙b (it scales the bias as well)
    extra = M * t["weight"].reshape(-1) * b
    view = (1, -1) + (1,) * (x.dim() - 2) if spec.is_conv else (-1,)
    assert extra.abs().max() > 1e-2
    torch.testing.assert_close(ly_bypass - ours, extra.reshape(view).expand_as(ours), rtol=1e-5, atol=1e-5)


def test_lycoris_cannot_reload_its_files_we_can():
    layer, _ = _layer("conv2d_3x3")
    spec = LayerSpec.from_module(layer)
    alg = get("ia3")
    t = _random(spec, True, 6)
    sd = _lyco(layer, t, True, 1.0, False).state_dict()
    assert set(sd) == {"weight", "on_input"}
    with pytest.raises(TypeError):
        IA3Module.make_module_from_state_dict("m", layer, sd["weight"], sd["on_input"])
    assert detect(sd) is alg
    w = layer.weight.detach()
    torch.testing.assert_close(alg.delta_weight(sd, spec, w), ref_delta(w, t["weight"], True).float(),
                               rtol=1e-6, atol=1e-6)
    # a file saved in fp16 carries on_input as a float
    sd16 = {k: v.half() for k, v in sd.items()}
    assert alg.describe(sd16)["on_input"] is True
    assert alg.describe({"weight": sd["weight"], "on_input": torch.tensor(0.0)})["on_input"] is False


def test_create():
    layer, _ = _layer("conv2d_3x3")
    spec = LayerSpec.from_module(layer)
    alg = get("ia3")
    for on_input in (False, True):
        t = alg.create(spec, alg.validate_options({"train_on_input": on_input}))
        assert t["on_input"].dtype == torch.int64 and t["on_input"].dim() == 0
        assert int(t["on_input"]) == int(on_input)
        assert t["weight"].shape == (1, 3 if on_input else 8, 1, 1)
        assert alg.delta_weight(t, spec, layer.weight.detach()).abs().max() == 0
    assert "on_input" in alg.frozen_keys and alg.weight_independent is False
    lin = LayerSpec.from_module(nn.Linear(6, 8))
    assert alg.create(lin, alg.validate_options({}))["weight"].shape == (8,)


@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 5), lambda: nn.Conv2d(4, 6, 3, padding=1),
                                  lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2)], ids=["linear", "conv", "grouped"])
@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_input_mode_takes_the_one_op_rebuild_path_with_the_delta_paths_values(make, multiplier):
    """Input-mode (IA)³ on a host layer in ``auto`` mode runs ``op(x ⊙ (1 + m·w), W, b)`` — one op instead
    of the frozen op plus ``op(x ⊙ w, W)``: the output and every gradient equal float64 math written here
    and the ``bypass`` path; output mode stays on the bypass path."""
    import lyco
    torch.manual_seed(0)
    module = make().double().requires_grad_(False)
    net = lyco.create(nn.Sequential(module), algo="ia3", preset="full", train_on_input=True, seed=0)
    (layer,) = net.layers.values()
    with torch.no_grad():
        layer.params.weight.normal_(0, 0.3)
    layer.multiplier = multiplier
    x = torch.randn((3, 6) if isinstance(module, nn.Linear) else (2, 4, 5, 5), dtype=torch.float64)

    def run(mode):
        layer.mode = mode
        xx = x.clone().requires_grad_(True)
        y = module(xx)
        y.pow(2).sum().backward()
        g = layer.params.weight.grad.clone()
        layer.params.weight.grad = None
        return y.detach(), xx.grad, g, layer.host._rebuild

    # the reference: (IA)³ scales the layer's input channels by 1 + m·w (bias untouched)
    w = layer.params.weight.detach().clone().reshape(-1).requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    s = (1 + multiplier * w).reshape((1, -1) + (1,) * (x.dim() - 2))
    if isinstance(module, nn.Linear):
        yr = torch.nn.functional.linear(xr * s, module.weight, module.bias)
    else:
        yr = torch.nn.functional.conv2d(xr * s, module.weight, module.bias, padding=1, groups=module.groups)
    yr.pow(2).sum().backward()

    auto, bypass = run("auto"), run("bypass")
    assert auto[3] is True and bypass[3] is False
    for got in (auto, bypass):
        torch.testing.assert_close(got[0], yr.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[1], xr.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[2].reshape(-1), w.grad, rtol=1e-10, atol=1e-10)
    # output mode rebuilds too (the rebuilt op: x kept, not f(x) − b; tested in test_fast_paths)
    out_net = lyco.create(nn.Sequential(nn.Linear(6, 5).double()), algo="ia3", preset="full", seed=0)
    assert next(iter(out_net.layers.values())).prefers_rebuild
    # the dropout family acts on the delta path: with it, input mode stays there
    drop = lyco.create(nn.Sequential(nn.Linear(6, 5).double()), algo="ia3", preset="full", train_on_input=True,
                       dropout=0.1, seed=0)
    assert not next(iter(drop.layers.values())).prefers_rebuild

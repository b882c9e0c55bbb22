"""Full (``diff``/``diff_b``) and Norm (``w_norm``/``b_norm``) against float64 references and LyCORIS."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from lycoris.modules.full import FullModule
from lycoris.modules.norms import NormModule

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
        "conv3d": (nn.Conv3d(2, 8, 3, padding=1), (1, 2, 4, 4, 4)),
        "layernorm": (nn.LayerNorm(8), (3, 5, 8)),
        "layernorm_nobias": (nn.LayerNorm(8, bias=False), (3, 8)),
        "groupnorm": (nn.GroupNorm(2, 8), (2, 8, 3, 3)),
        "layernorm_2axes": (nn.LayerNorm((2, 4)), (3, 2, 4)),
    }[case]
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() == 1 and "norm" in case else 0))
    return layer, torch.randn(shape, generator=g)


WEIGHT_CASES = ["linear_bias", "linear_nobias", "conv1d", "conv2d_1x1", "conv2d_3x3", "conv3d"]
NORM_CASES = ["layernorm", "layernorm_nobias", "groupnorm", "layernorm_2axes"]


def _rand_like(t, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v)
            for k, v in t.items()}


def ref_normalize(x, layer):
    """Affine-free normalisation written out (float64)."""
    x = x.double()
    if isinstance(layer, nn.LayerNorm):
        dims = tuple(range(-len(layer.normalized_shape), 0))
        mu = x.mean(dim=dims, keepdim=True)
        var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)
        return (x - mu) / torch.sqrt(var + layer.eps), -1
    n, c = x.shape[:2]
    xg = x.reshape(n, layer.num_groups, -1)
    mu = xg.mean(dim=-1, keepdim=True)
    var = ((xg - mu) ** 2).mean(dim=-1, keepdim=True)
    return ((xg - mu) / torch.sqrt(var + layer.eps)).reshape(x.shape), 1


def _chan(v, axis, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2)) if axis == 1 else v


# ---------------------------------------------------------------------------------------
# Full
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", WEIGHT_CASES + NORM_CASES)
def test_full_dense_and_forward(case):
    layer, x = _layer(case)
    layer, x = layer.double(), x.double()
    spec = LayerSpec.from_module(layer)
    alg = get("full")
    t = alg.create(spec, alg.validate_options({}))
    assert t["diff"].abs().max() == 0 and ("diff_b" in t) == (layer.bias is not None)
    t = {k: v.double() for k, v in _rand_like(t, 1).items()}
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    torch.testing.assert_close(alg.delta_weight(t, spec, w), t["diff"], rtol=0, atol=0)
    w2, b2 = alg.merged(t, spec, w, b, M)
    torch.testing.assert_close(w2, w + M * t["diff"], rtol=1e-14, atol=1e-14)
    if b is not None:
        torch.testing.assert_close(b2, b + M * t["diff_b"], rtol=1e-14, atol=1e-14)
    base = layer(x)
    fd = alg.forward_delta(x, t, spec, w, b, base)
    torch.testing.assert_close(base + M * fd, layer_op(x, spec, w2, b2), rtol=1e-10, atol=1e-10)
    if spec.is_norm:  # Δy = normalize(x)·diff + diff_b, written out
        xn, axis = ref_normalize(x, layer)
        ref = xn * _chan(t["diff"], axis, x.dim())
        if "diff_b" in t:
            ref = ref + _chan(t["diff_b"], axis, x.dim())
        torch.testing.assert_close(fd, ref, rtol=1e-10, atol=1e-10)


def test_full_gradients():
    layer, x = _layer("conv2d_3x3")
    spec = LayerSpec.from_module(layer)
    alg = get("full")
    t = _rand_like(alg.create(spec, alg.validate_options({})), 2)
    assert set(t) == {"diff", "diff_b"} and not (set(t) & alg.frozen_keys)
    for v in t.values():
        v.requires_grad_(True)
    base = layer(x).detach()
    g = torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    (alg.forward_delta(x, t, spec, layer.weight.detach(), layer.bias.detach(), base) * g).sum().backward()
    for k, v in t.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, k


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_full_matches_lycoris(case):
    layer, x = _layer(case)
    spec = LayerSpec.from_module(layer)
    alg = get("full")
    t = _rand_like(alg.create(spec, alg.validate_options({})), 3)
    w, b = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    with torch.no_grad():
        base = layer(x)
        ours = base + M * alg.forward_delta(x, t, spec, w, b, base)
        mod = FullModule.make_module_from_state_dict("m", layer, t["diff"], t.get("diff_b"))
        mod.multiplier = M
        lw, lb = mod.get_merged_weight(multiplier=M)
        torch.testing.assert_close(lw, alg.merged(t, spec, w, b, M)[0], rtol=1e-6, atol=1e-6)
        if b is not None:
            torch.testing.assert_close(lb, alg.merged(t, spec, w, b, M)[1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mod(x), ours, rtol=1e-5, atol=1e-5)
        assert detect(t) is alg


def test_full_bias_delta_on_bias_free_layer_is_ignored():
    layer, _ = _layer("linear_nobias")
    spec = LayerSpec.from_module(layer)
    alg = get("full")
    t = {"diff": torch.randn(8, 6), "diff_b": torch.randn(8)}
    w2, b2 = alg.merged(t, spec, layer.weight.detach(), None, 1.0)
    assert b2 is None
    torch.testing.assert_close(w2, layer.weight.detach() + t["diff"])


# ---------------------------------------------------------------------------------------
# Norm
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", NORM_CASES)
def test_norm_dense_and_forward(case):
    layer, x = _layer(case)
    layer, x = layer.double(), x.double()
    spec = LayerSpec.from_module(layer)
    alg = get("norm")
    t = alg.create(spec, alg.validate_options({}))
    assert t["w_norm"].abs().max() == 0 and ("b_norm" in t) == (layer.bias is not None)
    t = {k: v.double() for k, v in _rand_like(t, 4).items()}
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    w2, b2 = alg.merged(t, spec, w, b, M)
    torch.testing.assert_close(w2, w + M * t["w_norm"], rtol=1e-14, atol=1e-14)
    if b is not None:
        torch.testing.assert_close(b2, b + M * t["b_norm"], rtol=1e-14, atol=1e-14)
    base = layer(x)
    fd = alg.forward_delta(x, t, spec, w, b, base)
    xn, axis = ref_normalize(x, layer)
    ref = xn * _chan(t["w_norm"], axis, x.dim())
    if b is not None:
        ref = ref + _chan(t["b_norm"], axis, x.dim())
    torch.testing.assert_close(fd, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(base + M * fd, layer_op(x, spec, w2, b2), rtol=1e-10, atol=1e-10)


def test_norm_gradients():
    layer, x = _layer("groupnorm")
    spec = LayerSpec.from_module(layer)
    alg = get("norm")
    t = _rand_like(alg.create(spec, alg.validate_options({})), 5)
    assert set(t) == {"w_norm", "b_norm"} and not (set(t) & alg.frozen_keys)
    for v in t.values():
        v.requires_grad_(True)
    base = layer(x).detach()
    g = torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    (alg.forward_delta(x, t, spec, layer.weight.detach(), layer.bias.detach(), base) * g).sum().backward()
    for k, v in t.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, k


@pytest.mark.parametrize("case", ["layernorm", "groupnorm"])
def test_norm_matches_lycoris(case):
    layer, x = _layer(case)
    spec = LayerSpec.from_module(layer)
    alg = get("norm")
    t = _rand_like(alg.create(spec, alg.validate_options({})), 6)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    with torch.no_grad():
        mod = NormModule.make_module_from_state_dict("m", layer, t["w_norm"], t["b_norm"])
        mod.multiplier = M
        lw, lb = mod.get_merged_weight(multiplier=M)
        ow, ob = alg.merged(t, spec, w, b, M)
        torch.testing.assert_close(lw, ow, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lb, ob, rtol=1e-6, atol=1e-6)
        base = layer(x)
        torch.testing.assert_close(mod(x), base + M * alg.forward_delta(x, t, spec, w, b, base),
                                   rtol=1e-5, atol=1e-5)
        assert detect(mod.state_dict()) is alg


def test_norm_export_always_writes_b_norm():
    layer, x = _layer("layernorm_nobias")
    spec = LayerSpec.from_module(layer)
    alg = get("norm")
    t = _rand_like(alg.create(spec, alg.validate_options({})), 7)
    e = alg.export(t)
    assert set(e) == {"w_norm", "b_norm"} and e["b_norm"].abs().max() == 0  # A1111 needs both keys
    base = layer(x)
    torch.testing.assert_close(alg.forward_delta(x, e, spec, layer.weight, None, base),
                               alg.forward_delta(x, t, spec, layer.weight, None, base))
    assert alg.merged(e, spec, layer.weight.detach(), None, 1.0)[1] is None
    assert not get("norm").supports(LayerSpec.from_module(nn.Linear(3, 3)))

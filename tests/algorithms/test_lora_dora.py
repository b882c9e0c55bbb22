"""LoRA/LoCon (+Tucker, rs-LoRA, scalar, DyLoRA) and DoRA against dense float64 math."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lyco import algorithms
from lyco.algorithms.base import LayerSpec
from lyco.algorithms.dora import wrap
from lyco.algorithms.lora import DyLoRA, truncate



@pytest.fixture(autouse=True)
def _fp64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

LAYERS = {
    "linear": lambda: nn.Linear(12, 10),
    "linear_nobias": lambda: nn.Linear(12, 10, bias=False),
    "conv1d": lambda: nn.Conv1d(6, 8, 3, padding=1),
    "conv2d_1x1": lambda: nn.Conv2d(6, 8, 1),
    "conv2d_3x3": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1),
    "conv2d_dil": lambda: nn.Conv2d(6, 8, 3, padding=2, dilation=2),
    "conv3d": lambda: nn.Conv3d(4, 6, (3, 1, 3), padding=(1, 0, 1)),
    "conv2d_grouped": lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2),
}


def _x(layer):
    if isinstance(layer, nn.Linear):
        return torch.randn(2, 3, layer.in_features)
    n = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(layer)]
    return torch.randn((2, layer.in_channels) + (7,) * n)


def _randomise(t):
    g = torch.Generator().manual_seed(1)
    return {k: (torch.randn(v.shape, generator=g, dtype=torch.float64) if k not in ("alpha",) else v.double())
            for k, v in t.items()}


def _dense_lora(t, shape):
    up = t["lora_up.weight"].reshape(t["lora_up.weight"].shape[0], -1).double()
    down = t["lora_down.weight"].double()
    r = down.shape[0]
    gamma = float(t["alpha"]) / r
    if "lora_mid.weight" in t:
        mid = t["lora_mid.weight"].double()
        d2 = down.reshape(r, -1)
        out = torch.zeros(shape, dtype=torch.float64)
        # ΔW[p,q,k...] = Σ_i Σ_j up[p,i] mid[i,j,k...] down[j,q]
        for i in range(r):
            for j in range(r):
                out += up[:, i].reshape(-1, *[1] * (len(shape) - 1)) * mid[i, j].unsqueeze(0).unsqueeze(0) \
                    * d2[j].reshape(1, -1, *[1] * (len(shape) - 2))
        res = out
    else:
        res = (up @ down.reshape(r, -1)).reshape(shape)
    s = t.get("scalar")
    return res * gamma * (float(s) if s is not None else 1.0)


@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("cfg", [{}, {"use_tucker": True}, {"use_scalar": True}, {"rs_lora": True}])
def test_lora_delta_and_bypass(layer_name, cfg):
    torch.manual_seed(0)
    layer = LAYERS[layer_name]().double()
    spec = LayerSpec.from_module(layer)
    alg = algorithms.get("lora")
    opts = alg.validate_options({"rank": 3, "alpha": 5.0, **cfg})
    t = _randomise(alg.create(spec, opts))
    if cfg.get("rs_lora"):
        assert float(t["alpha"]) == pytest.approx(5.0 * math.sqrt(3))  # stored α·√r
    if cfg.get("use_tucker") and spec.is_kxk_conv:
        assert "lora_mid.weight" in t
    dw = alg.delta_weight(t, spec)
    ref = _dense_lora(t, spec.weight_shape)
    torch.testing.assert_close(dw, ref, rtol=1e-10, atol=1e-10)
    # bypass == op(x, W + m ΔW)
    x = _x(layer)
    m = 0.7
    base = layer(x)
    y_bypass = base + m * alg.forward_delta(x, t, spec, layer.weight, layer.bias, base)
    w2 = layer.weight + m * ref
    y_ref = layer._conv_forward(x, w2, layer.bias) if hasattr(layer, "_conv_forward") else F.linear(x, w2, layer.bias)
    torch.testing.assert_close(y_bypass, y_ref, rtol=1e-9, atol=1e-9)


def test_lora_export_folds_scalar():
    spec = LayerSpec.from_module(nn.Linear(5, 4))
    alg = algorithms.get("lora")
    t = _randomise(alg.create(spec, alg.validate_options({"rank": 2, "alpha": 1, "use_scalar": True})))
    e = alg.export(t)
    assert "scalar" not in e
    torch.testing.assert_close(alg.delta_weight(e, spec), alg.delta_weight(t, spec))


def test_lora_rank_mask_drops_rank_components():
    layer = nn.Linear(6, 5).double()
    spec = LayerSpec.from_module(layer)
    alg = algorithms.get("lora")
    t = _randomise(alg.create(spec, alg.validate_options({"rank": 4, "alpha": 4})))
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    x = torch.randn(3, 6)
    d = alg.forward_delta(x, t, spec, layer.weight, layer.bias, layer(x), rank_mask=mask)
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    ref = x @ (up[:, [0, 2]] @ down[[0, 2]]).T
    torch.testing.assert_close(d, ref)


def test_dylora_prefix_and_truncate():
    spec = LayerSpec.from_module(nn.Linear(8, 6))
    alg = algorithms.get("dylora")
    t = _randomise(alg.create(spec, alg.validate_options({"rank": 4, "alpha": 2.0, "block_size": 2})))
    p = DyLoRA.prefix(t, 2, 2)
    # at prefix rank b the scale is alpha / b (the DyLoRA paper), equal to a truncated LoRA file
    ref = (t["lora_up.weight"][:, :2] @ t["lora_down.weight"][:2]) * (2.0 / 2)
    torch.testing.assert_close(alg.delta_weight(p, spec), ref)
    torch.testing.assert_close(algorithms.get("lora").delta_weight(truncate(t, 2), spec), ref)
    # blocks below the sampled one are detached
    tt = {k: v.clone().requires_grad_(k != "alpha") for k, v in t.items()}
    p = DyLoRA.prefix(tt, 4, 2)
    alg.delta_weight(p, spec).sum().backward()
    assert tt["lora_up.weight"].grad[:, :2].abs().sum() == 0
    assert tt["lora_up.weight"].grad[:, 2:].abs().sum() > 0
    rs = {DyLoRA.sample_rank(8, 2) for _ in range(200)}
    assert rs == {2, 4, 6, 8}


def _dense_dora(W, delta, mag, axis):
    Wc = W + delta
    if axis == "out":
        n = Wc.reshape(Wc.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (W.dim() - 1))
    else:
        n = Wc.transpose(0, 1).reshape(Wc.shape[1], -1).norm(dim=1).reshape((1, -1) + (1,) * (W.dim() - 2))
    return Wc * mag.reshape(n.shape) / (n + torch.finfo(torch.float32).eps) - W


@pytest.mark.parametrize("layer_name", ["linear", "conv2d_3x3", "conv2d_1x1", "conv1d", "conv2d_grouped"])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_on_lora(layer_name, axis):
    torch.manual_seed(3)
    layer = LAYERS[layer_name]().double()
    spec = LayerSpec.from_module(layer)
    inner = algorithms.get("lora")
    t = _randomise(inner.create(spec, inner.validate_options({"rank": 3, "alpha": 2.0})))
    W = layer.weight.detach()
    shape = (spec.out_dim,) + (1,) * (W.dim() - 1) if axis == "out" else (1, spec.in_dim) + (1,) * (W.dim() - 2)
    t["dora_scale"] = torch.rand(shape) + 0.5
    alg = wrap(inner)
    ref = _dense_dora(W, _dense_lora(t, spec.weight_shape), t["dora_scale"], axis)
    torch.testing.assert_close(alg.delta_weight(t, spec, W), ref, rtol=1e-9, atol=1e-9)
    x = _x(layer)
    m = 0.6
    base = layer(x)
    y = base + m * alg.forward_delta(x, t, spec, layer.weight, layer.bias, base)
    w2 = W + m * ref
    y_ref = layer._conv_forward(x, w2, layer.bias) if hasattr(layer, "_conv_forward") else F.linear(x, w2, layer.bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-8, atol=1e-8)


def test_detect_for_wraps_dora_and_rejects_unknown():
    t = {"lora_up.weight": torch.zeros(4, 2), "lora_down.weight": torch.zeros(2, 3), "dora_scale": torch.ones(4, 1)}
    alg = algorithms.detect_for(t)
    assert getattr(alg, "is_dora", False) and alg.inner.name == "lora"
    assert algorithms.detect_for({"foo": torch.zeros(1)}) is None


def test_options_validated_strictly():
    alg = algorithms.get("lora")
    with pytest.raises(Exception, match="unknown option 'use_tuker'"):
        alg.validate_options({"use_tuker": True})
    assert alg.validate_options({"use_tucker": "False"})["use_tucker"] is False
    with pytest.raises(Exception, match="expected a boolean"):
        alg.validate_options({"use_tucker": "maybe"})

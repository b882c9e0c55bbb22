"""GLoRA against dense float64 references, the pre-3.0 layout rule, and LyCORIS 4.1.3's forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from lycoris.modules.glora import GLoRAModule

from lyco.algorithms import detect, get
from lyco.algorithms.base import LayerSpec, layer_op
from lyco.errors import ConfigError

M = 0.7
IN, OUT, R = 6, 8, 3
KEYS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


def _layer(case: str) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    layer, shape = {
        "linear_bias": (nn.Linear(IN, OUT), (3, 5, IN)),
        "linear_nobias": (nn.Linear(IN, OUT, bias=False), (4, IN)),
        "conv1d": (nn.Conv1d(IN, OUT, 3, padding=1), (2, IN, 7)),
        "conv2d_1x1": (nn.Conv2d(IN, OUT, 1), (2, IN, 5, 5)),
        "conv2d_3x3": (nn.Conv2d(IN, OUT, 3, stride=2, padding=1), (2, IN, 7, 7)),
        "conv2d_reflect": (nn.Conv2d(IN, OUT, 3, padding=1, padding_mode="reflect"), (1, IN, 6, 5)),
        "conv3d": (nn.Conv3d(IN, OUT, 3, padding=1), (1, IN, 4, 4, 4)),
    }[case]
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer, torch.randn(shape, generator=g)


CASES = ["linear_bias", "linear_nobias", "conv1d", "conv2d_1x1", "conv2d_3x3", "conv2d_reflect", "conv3d"]


def _random(spec, seed, alpha=2.0, use_scalar=False):
    g = torch.Generator().manual_seed(seed)
    alg = get("glora")
    t = alg.create(spec, alg.validate_options({"rank": R, "alpha": alpha, "use_scalar": use_scalar}),
                   generator=g)
    for k in KEYS:
        t[k] = torch.randn(t[k].shape, generator=g) * 0.4
    if use_scalar:
        t["scalar"] = torch.tensor(0.8)
    return t


def ref_delta_new(w, t):
    """γ·(W·A1·A2 + B1·B2), γ = alpha / a2.shape[0], in float64 with tensordot/matmul."""
    w = w.double()
    r = t["a2.weight"].shape[0]
    gamma = float(t["alpha"]) / r * float(t.get("scalar", torch.tensor(1.0)))
    a1 = t["a1.weight"].double().reshape(w.shape[1], r)
    a2 = t["a2.weight"].double().reshape(r, w.shape[1])
    wa = torch.tensordot(w, a1 @ a2, dims=([1], [0])).movedim(-1, 1)  # (out, in, *k)
    bb = (t["b1.weight"].double().reshape(w.shape[0], r) @ t["b2.weight"].double().reshape(r, -1))
    return gamma * (wa + bb.reshape(w.shape))


def _double(t):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in t.items()}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_scalar", [False, True])
def test_glora_dense_and_forward(case, use_scalar):
    layer, x = _layer(case)
    layer, x = layer.double(), x.double()
    spec = LayerSpec.from_module(layer)
    alg = get("glora")
    t = _double(_random(spec, 1, use_scalar=use_scalar))
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    ref = ref_delta_new(w, t)
    torch.testing.assert_close(alg.delta_weight(t, spec, w), ref, rtol=1e-10, atol=1e-10)
    w2, b2 = alg.merged(t, spec, w, b, M)
    torch.testing.assert_close(w2, w + M * ref, rtol=1e-10, atol=1e-10)
    assert b2 is b
    base = layer(x)
    got = base + M * alg.forward_delta(x, t, spec, w, b, base)
    torch.testing.assert_close(got, layer_op(x, spec, w2, b2), rtol=1e-9, atol=1e-9)
    # the exported file (scalar folded into a2 and b2) means the same
    e = alg.export(t)
    assert "scalar" not in e
    torch.testing.assert_close(alg.delta_weight(e, spec, w), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("use_scalar", [False, True])
def test_glora_gradients_reach_all_tensors(use_scalar):
    layer, x = _layer("conv2d_3x3")
    spec = LayerSpec.from_module(layer)
    alg = get("glora")
    t = _random(spec, 2, use_scalar=use_scalar)
    trainable = [k for k in t if k not in alg.frozen_keys]
    assert set(trainable) == set(KEYS) | ({"scalar"} if use_scalar else set())
    for k in trainable:
        t[k].requires_grad_(True)
    base = layer(x).detach()
    g = torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    (alg.forward_delta(x, t, spec, layer.weight.detach(), layer.bias.detach(), base) * g).sum().backward()
    for k in trainable:
        assert t[k].grad is not None and t[k].grad.abs().sum() > 0, k


# ---------------------------------------------------------------------------------------
# LyCORIS parity (its rebuild and bypass forwards agree with each other for GLoRA)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["linear_bias", "linear_nobias", "conv1d", "conv2d_1x1", "conv2d_3x3", "conv3d"])
@pytest.mark.parametrize("bypass", [False, True])
def test_matches_lycoris(case, bypass):
    layer, x = _layer(case)
    spec = LayerSpec.from_module(layer)
    alg = get("glora")
    t = _random(spec, 3, alpha=2.0)
    mod = GLoRAModule("m", layer, M, lora_dim=R, alpha=2.0, bypass_mode=bypass)
    with torch.no_grad():
        for k in KEYS:
            getattr(mod, k.split(".")[0]).weight.copy_(t[k])
        w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
        torch.testing.assert_close(alg.merged(t, spec, w, b, M)[0], mod.get_merged_weight(multiplier=M)[0],
                                   rtol=1e-5, atol=1e-5)
        base = layer(x)
        ours = base + M * alg.forward_delta(x, t, spec, w, b, base)
        torch.testing.assert_close(ours, mod(x), rtol=1e-5, atol=1e-5)
        # and the file LyCORIS would write reads back to the same delta
        sd = {k: v for k, v in mod.state_dict().items()}
        assert detect(sd) is alg
        torch.testing.assert_close(alg.delta_weight(sd, spec, w), alg.delta_weight(t, spec, w),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["linear_bias", "conv2d_3x3"])
def test_create_matches_lycoris_layout(case):
    layer, _ = _layer(case)
    spec = LayerSpec.from_module(layer)
    alg = get("glora")
    mod = GLoRAModule("m", layer, 1.0, lora_dim=R, alpha=1.5)
    for use_scalar in (False, True):
        t = alg.create(spec, alg.validate_options({"rank": R, "alpha": 1.5, "use_scalar": use_scalar}))
        for k in KEYS:
            assert t[k].shape == getattr(mod, k.split(".")[0]).weight.shape, k
        assert float(t["alpha"]) == 1.5  # raw
        assert alg.delta_weight(t, spec, layer.weight.detach()).abs().max() == 0
        assert alg.rank(t) == R
    assert alg.scale(t) == pytest.approx(1.5 / R)


# ---------------------------------------------------------------------------------------
# Pre-3.0 ("old") orientation, read the way ComfyUI does
# ---------------------------------------------------------------------------------------

def ref_delta_old(w, t):
    """γ·(b2·b1 + W·a2·a1) on flattened tensors, γ = alpha / a1.shape[0]."""
    w = w.double()
    f = {k: t[k].double().reshape(t[k].shape[0], -1) for k in KEYS}
    gamma = float(t["alpha"]) / t["a1.weight"].shape[0]
    d = f["b2.weight"] @ f["b1.weight"] + w.reshape(w.shape[0], -1) @ f["a2.weight"] @ f["a1.weight"]
    return gamma * d.reshape(w.shape)


def _old_tensors(out, inn, r, seed, conv=False):
    g = torch.Generator().manual_seed(seed)
    tail = (1, 1) if conv else ()
    shapes = {"a1.weight": (r, inn), "a2.weight": (inn, r), "b1.weight": (r, inn), "b2.weight": (out, r)}
    t = {k: torch.randn(s + tail, generator=g, dtype=torch.float64) * 0.4 for k, s in shapes.items()}
    t["alpha"] = torch.tensor(2.0)
    return t


@pytest.mark.parametrize("case", ["linear_bias", "conv2d_1x1"])
def test_old_layout_read_like_comfyui(case):
    layer, x = _layer(case)
    layer, x = layer.double(), x.double()
    spec = LayerSpec.from_module(layer)
    alg = get("glora")
    t = _old_tensors(OUT, IN, R, 4, conv=spec.is_conv)
    assert alg.describe(t)["layout"] == "old" and alg.rank(t) == R
    w, b = layer.weight.detach(), layer.bias.detach()
    ref = ref_delta_old(w, t)
    torch.testing.assert_close(alg.delta_weight(t, spec, w), ref, rtol=1e-10, atol=1e-10)
    base = layer(x)
    torch.testing.assert_close(base + M * alg.forward_delta(x, t, spec, w, b, base),
                               layer_op(x, spec, w + M * ref, b), rtol=1e-9, atol=1e-9)


def test_square_layer_layout_rule():
    layer = nn.Linear(IN, IN).double()
    spec = LayerSpec.from_module(layer)
    w = layer.weight.detach()
    alg = get("glora")
    # an old file on a square layer matches both patterns; a2[0] == out → old
    t_old = _old_tensors(IN, IN, R, 5)
    torch.testing.assert_close(alg.delta_weight(t_old, spec, w), ref_delta_old(w, t_old), rtol=1e-10, atol=1e-10)
    # a new file on a square layer with r < width: also both patterns, a2[0] = r → new
    t_new = _double(_random(spec, 6))
    torch.testing.assert_close(alg.delta_weight(t_new, spec, w), ref_delta_new(w, t_new), rtol=1e-10, atol=1e-10)
    # r == in == out is read as old, as ComfyUI and A1111 do, and we refuse to create it
    g = torch.Generator().manual_seed(7)
    t_amb = {k: torch.randn(IN, IN, generator=g, dtype=torch.float64) for k in KEYS}
    t_amb["alpha"] = torch.tensor(3.0)
    torch.testing.assert_close(alg.delta_weight(t_amb, spec, w), ref_delta_old(w, t_amb), rtol=1e-10, atol=1e-10)
    with pytest.raises(ConfigError):
        alg.create(spec, alg.validate_options({"rank": IN}))


def test_missing_alpha_means_scale_one_and_bm_is_ignored():
    layer, _ = _layer("linear_bias")
    spec = LayerSpec.from_module(layer)
    alg = get("glora")
    t = _random(spec, 8)
    t["alpha"] = torch.tensor(float(R))
    no_alpha = {k: v for k, v in t.items() if k != "alpha"}
    no_alpha["bm.weight"] = torch.randn(R, R)
    w = layer.weight.detach()
    torch.testing.assert_close(alg.delta_weight(no_alpha, spec, w), alg.delta_weight(t, spec, w))
    assert detect(no_alpha) is alg


def test_grouped_conv_not_supported():
    spec = LayerSpec.from_module(nn.Conv2d(4, 8, 3, groups=2))
    alg = get("glora")
    assert not alg.supports(spec)
    with pytest.raises(ConfigError):
        alg.create(spec, alg.validate_options({"rank": 2}))

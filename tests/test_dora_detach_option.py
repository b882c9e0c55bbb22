"""``dora_detach_norm`` reachable from ``lyco.create`` (and so from the trainer's ``[network] options``).

The reference is written here from the DoRA definition in dense float64 math — W_c = W + γ·up·down,
n = ‖W_c‖ on the magnitude axis (+ fp32 eps), W_d = W_c·m/n, W′ = W + s·(W_d − W), y = op(x, W′, b) —
with n computed under ``torch.no_grad`` for the detached form, and with autograd through n for the
plain form. Nothing is compared with lyco's own output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lyco
from lyco import ConfigError

_EPS = torch.finfo(torch.float32).eps  # DoRA's ε (LyCORIS adds the fp32 eps to the norm)


def _norm(w: torch.Tensor, axis: str) -> torch.Tensor:
    """‖w‖ per output channel (shape (out,1,…)) or per input channel (shape (1,in,1,…))."""
    dims = tuple(d for d in range(w.dim()) if d != (0 if axis == "out" else 1))
    return w.pow(2).sum(dim=dims, keepdim=True).sqrt()


def _reference(w, b, up, down, mag, gamma, s, axis, detach, x):
    delta = torch.einsum("or,r...->o...", up.flatten(1), down)  # up·down, kernel dims kept
    wc = w + gamma * delta
    if detach:
        with torch.no_grad():
            n = _norm(wc, axis) + _EPS
    else:
        n = _norm(wc, axis) + _EPS
    wp = w + s * (wc * mag.reshape(n.shape) / n - w)
    return F.linear(x, wp, b) if w.dim() == 2 else F.conv2d(x, wp, b, padding=1)


def _perturbed(model, axis, multiplier, **opts):
    net = lyco.create(model, preset="full", algo="lora", rank=3, alpha=2.0, conv_rank=3, conv_alpha=2.0,
                      dora=True, dora_axis=axis, seed=0, **opts)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    net.set_multiplier(multiplier)
    return net


CASES = [("linear", "out"), ("linear", "in"), ("conv", "out")]


@pytest.mark.parametrize("kind,axis", CASES)
@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_create_option_matches_detached_reference(kind, axis, multiplier):
    torch.manual_seed(0)
    mod = nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(4, 5, 12) if kind == "linear" else torch.randn(2, 4, 7, 7)
    model, x = nn.Sequential(mod).double(), x.double()

    def run(detach):
        torch.manual_seed(1)
        net = _perturbed(model, axis, multiplier, dora_detach_norm=detach)
        (layer,) = net.layers.values()
        assert layer.opts.get("dora_detach_norm", False) is detach
        t = layer.tensors()
        keys = ("lora_up.weight", "lora_down.weight", "dora_scale")
        xx = x.clone().requires_grad_(True)
        out = model[0](xx)
        (out.square().sum() + out.sum()).backward()
        grads = [t[k].grad.clone() for k in keys] + [xx.grad]
        params = [t[k].detach().clone() for k in keys]
        net.detach()
        return out.detach(), grads, params, float(t["alpha"]) / 3

    def reference(params, gamma, detach):
        ps = [p.clone().requires_grad_(True) for p in params]
        xx = x.clone().requires_grad_(True)
        w, b = model[0].weight.detach(), model[0].bias.detach()
        ref = _reference(w, b, *ps, gamma, multiplier, axis, detach, xx)
        (ref.square().sum() + ref.sum()).backward()
        return ref.detach(), [p.grad for p in ps] + [xx.grad]

    out_d, g_d, params, gamma = run(True)
    out_f, g_f, params_f, _ = run(False)
    for a, b in zip(params, params_f):  # same seed, same perturbation: the same adapter both times
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref_d, rg_d = reference(params, gamma, detach=True)
    ref_f, rg_f = reference(params, gamma, detach=False)

    torch.testing.assert_close(out_d, ref_d, rtol=1e-10, atol=1e-10)  # forward: the DoRA value
    torch.testing.assert_close(out_f, ref_d, rtol=1e-10, atol=1e-10)  # (both forms)
    for a, b in zip(g_d, rg_d):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)        # option on: detached gradients
    for a, b in zip(g_f, rg_f):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)        # option off: exact gradients
    # the option really changes the directional gradients (up, down); the magnitude's is exact either way
    assert not torch.allclose(rg_d[0], rg_f[0], rtol=1e-6, atol=1e-8)
    assert not torch.allclose(g_d[0], g_f[0], rtol=1e-6, atol=1e-8)
    assert not torch.allclose(g_d[1], g_f[1], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_d[2], g_f[2], rtol=1e-9, atol=1e-10)


def test_option_reaches_layers_from_overrides_and_strings():
    """A kohya-style string is coerced; an override that switches algorithm keeps the option; layers
    without DoRA do not get it."""
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    net = lyco.create(model, preset="full", rank=2, dora=True, dora_detach_norm="true",
                      overrides={"2": {"algo": "loha", "dora": False}})
    opts = {name: layer.opts.get("dora_detach_norm") for name, layer in net.layers.items()}
    assert sorted(opts.values(), key=str) == [None, True], opts
    net = lyco.create(model, preset="full", rank=2, dora=True, overrides={"2": {"algo": "loha"}},
                      dora_detach_norm=True)
    assert [layer.opts.get("dora_detach_norm") for layer in net.layers.values()] == [True, True]


@pytest.mark.parametrize("kwargs,match", [
    ({"dora": True, "dora_detach_nrom": True}, "unknown option 'dora_detach_nrom'"),
    ({"dora": True, "dora_detach_norm": "maybe"}, "option 'dora_detach_norm': expected a boolean, got 'maybe'"),
    ({"dora_detach_norm": True}, "dora_detach_norm set but no layer uses DoRA"),
])
def test_bad_options_error_clearly(kwargs, match):
    model = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(ConfigError, match=match):
        lyco.create(model, preset="full", rank=2, **kwargs)
    x = torch.randn(3, 6)  # a failed create leaves the model as it was
    torch.testing.assert_close(model(x), F.linear(x, model[0].weight, model[0].bias), rtol=0, atol=0)

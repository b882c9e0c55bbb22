"""LoKr with a full W2 on a linear layer: the factors' gradients straight from ∂y and x (``lokr.kron_linear_grads``,
``_KronBuild.direct_ok`` / ``direct_grads``, taken by the rebuilt op's backward in place of ``∂W′``).

Checked against float64 autograd through ``torch.kron`` (the function alone: both contraction orders, one row and
many, each gradient alone and both, a scale; bf16 rows against float64), and in the rebuilt op of a LoKr full-matrix
network against the plain bypass sum (outputs, the input's and every factor's gradient), with the rule's threshold."""

import math
import os

import pytest
import torch
import torch.nn as nn

import lyco
from lyco.algorithms import lokr as lokr_mod
from lyco.algorithms.base import CONV2D, LINEAR, LayerSpec
from lyco import layer as layer_mod


def _reference(x, gy, w1, w2, s):
    """∂W1, ∂W2 of ``Σ gy ⊙ (x·(s·kron(W1, W2))ᵀ)`` by float64 autograd through ``torch.kron``."""
    a = w1.double().clone().requires_grad_()
    b = w2.double().clone().requires_grad_()
    y = x.double() @ (s * torch.kron(a, b)).t()
    g1, g2 = torch.autograd.grad((y * gy.double()).sum(), (a, b))
    return g1, g2


# (out_l, in_m, out_k, in_n): in_m·out_k ≤ out_l·in_n takes (T, G), else (Z, H) — both orders, and unequal factors
SHAPES = [(2, 3, 5, 4), (3, 2, 4, 7), (4, 4, 6, 3), (2, 5, 3, 9), (1, 1, 4, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_kron_linear_grads_match_float64(shape, rows, needs):
    check_direct_form(lokr_mod.kron_linear_grads, shape, rows, needs)


def check_direct_form(form, shape, rows, needs):
    """``form`` (a direct factor-gradient function: the library's, or the experiment's permuted one) on float64 rows
    and factors of ``shape`` against :func:`_reference`: each gradient asked for within 1e-12, the others None."""
    L, M, K, N = shape
    g = torch.Generator().manual_seed(sum(shape) + rows)
    x = torch.randn(rows, M * N, generator=g, dtype=torch.float64)
    gy = torch.randn(rows, L * K, generator=g, dtype=torch.float64)
    w1 = torch.randn(L, M, generator=g, dtype=torch.float64)
    w2 = torch.randn(K, N, generator=g, dtype=torch.float64)
    got = form(x, gy, w1, w2, 0.7, (torch.float64, torch.float64), needs)
    want = _reference(x, gy, w1, w2, 0.7)
    for n, a, b in zip(needs, got, want):
        if n:
            assert a.shape == b.shape and a.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        else:
            assert a is None


@pytest.mark.parametrize("shape", SHAPES[:4])
def test_kron_linear_grads_bf16_rows_fp32_out(shape):
    """bf16 rows (the step's compute dtype), fp32 factors and gradients: within bf16's rounding of the intermediate
    of float64 on the same (rounded) inputs."""
    L, M, K, N = shape
    g = torch.Generator().manual_seed(11 + sum(shape))
    x = torch.randn(64, M * N, generator=g).bfloat16()
    gy = torch.randn(64, L * K, generator=g).bfloat16()
    w1 = torch.randn(L, M, generator=g)
    w2 = torch.randn(K, N, generator=g)
    got = lokr_mod.kron_linear_grads(x, gy, w1, w2, 1.3, (torch.float32, torch.float32))
    want = _reference(x, gy, w1.bfloat16(), w2.bfloat16(), 1.3)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < 2e-2, err


def test_direct_rule_follows_the_rows(monkeypatch):
    """Rows ≤ c·out·in/(out + in) on a linear layer of at least DIRECT_MIN weight elements; never at c = 0 or on a
    conv."""
    build = lokr_mod._KronBuild(1.0)
    spec = LayerSpec(kind=LINEAR, weight_shape=(1280, 1280))     # harmonic width 640
    x = torch.empty(1024, 1280)
    monkeypatch.setattr(lokr_mod._KronBuild, "DIRECT_ROWS", 1.6)
    monkeypatch.setattr(lokr_mod._KronBuild, "DIRECT_MIN", 1280 * 1280 + 1.0)
    assert not build.direct_ok(spec, x)
    monkeypatch.setattr(lokr_mod._KronBuild, "DIRECT_MIN", 1280 * 1280)
    monkeypatch.setattr(lokr_mod._KronBuild, "DIRECT_ROWS", 0.0)
    assert not build.direct_ok(spec, x)
    monkeypatch.setattr(lokr_mod._KronBuild, "DIRECT_ROWS", 1.6)
    assert build.direct_ok(spec, x)                               # 1024 = 1.6 · 640
    monkeypatch.setattr(lokr_mod._KronBuild, "DIRECT_ROWS", 1.59)
    assert not build.direct_ok(spec, x)
    monkeypatch.setattr(lokr_mod._KronBuild, "DIRECT_ROWS", math.inf)
    conv = LayerSpec(kind=CONV2D, weight_shape=(8, 8, 3, 3), padding=(1, 1))
    assert not build.direct_ok(conv, torch.empty(2, 8, 4, 4))


def test_direct_rule_defaults_take_the_geglu_projection_only():
    """Unset (change 177): of SDXL's linear layer shapes at batch 1 and 4, the 1280 → 10240 GEGLU projection alone
    — the one shape run 330 measured the direct form faster on."""
    for var in ("LYCO_LOKR_DIRECT_ROWS", "LYCO_LOKR_DIRECT_MIN"):  # read at import: the suite runs without them
        assert var not in os.environ, var
    build = lokr_mod._KronBuild(1.0)
    taken = set()
    for rows, inp, out in [(4096, 640, 640), (77, 2048, 640), (4096, 640, 5120), (4096, 2560, 640),
                           (1024, 1280, 1280), (77, 2048, 1280), (1024, 1280, 10240), (1024, 5120, 1280)]:
        for batch in (1, 4):
            if build.direct_ok(LayerSpec(kind=LINEAR, weight_shape=(out, inp)), torch.empty(rows * batch, inp)):
                taken.add((inp, out))
    assert taken == {(1280, 10240)}


class _Net(nn.Module):
    """Linear layers of factorable widths (factor 4: W1 4×4 or 4×… with W2 full), a 3-D and a 2-D input, one that
    widens (32 → 96: the (Z, H) order) and one that narrows (96 → 32: the (T, G) order)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 96)
        self.lin_nb = nn.Linear(96, 32, bias=False)
        self.lin2d = nn.Linear(32, 16)

    def forward(self, tok):
        t = self.lin_nb(torch.tanh(self.lin(tok)))                   # 3-D input
        return self.lin2d(t.mean(1))                                 # 2-D input


def _step(model, net, tok):
    tok = tok.clone().requires_grad_(True)
    out = model(tok)
    (out.square().sum() + out.sum()).backward()
    grads = [p.grad.clone() for p in net.trainable_parameters()]
    for p in net.trainable_parameters():
        p.grad = None
    return out.detach(), tok.grad, grads


def _reference_accumulate(self, acc, x, weight, bias, base_out, inplace=False):
    d = self.delta_output(x, weight, bias, base_out)
    return acc if d is None else acc + d.to(acc.dtype)


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
@pytest.mark.parametrize("scalar", [False, True])
def test_rebuilt_op_direct_equals_plain_sum(multiplier, scalar, monkeypatch):
    """A LoKr full-matrix network on the rebuilt op with every linear layer's factor gradients in the direct form
    against the plain bypass sum (``delta_output``: ΔW materialised by ``torch.kron``), float64 — and the direct
    form really taken (a spy on ``direct_grads``, the ∂W′ backward never called)."""
    torch.manual_seed(0)
    model = _Net().double()
    net = lyco.create(model, preset="full", seed=0, algo="lokr", rank=1, factor=4, full_matrix=True,
                      use_scalar=scalar)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_((0.3 * torch.randn(p.shape, generator=g)).to(p.dtype))
    assert all("lokr_w2" in layer.params for layer in net.layers.values())
    net.set_multiplier(multiplier)
    tok = torch.randn(2, 5, 32, generator=g, dtype=torch.float64)
    calls = {"direct": 0, "vjp": 0}
    direct, vjp = lokr_mod._KronBuild.direct_grads, lokr_mod._KronBuild.vjp

    def spy_direct(self, *a):
        calls["direct"] += 1
        return direct(self, *a)

    def spy_vjp(self, *a):
        calls["vjp"] += 1
        return vjp(self, *a)

    monkeypatch.setattr(lokr_mod._KronBuild, "DIRECT_ROWS", math.inf)
    monkeypatch.setattr(lokr_mod._KronBuild, "DIRECT_MIN", 0.0)
    monkeypatch.setattr(lokr_mod._KronBuild, "direct_grads", spy_direct)
    monkeypatch.setattr(lokr_mod._KronBuild, "vjp", spy_vjp)
    for layer in net.layers.values():
        layer.mode = "rebuild"
    fast = _step(model, net, tok)
    assert calls == {"direct": 3, "vjp": 0}, calls
    for layer in net.layers.values():
        layer.mode = "bypass"
    monkeypatch.setattr(layer_mod.AdapterLayer, "accumulate", _reference_accumulate)
    ref = _step(model, net, tok)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-10, atol=1e-10)
    assert len(fast[2]) == len(ref[2]) > 0
    for a, b in zip((fast[1], *fast[2]), (ref[1], *ref[2])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)

"""A low-rank adapted linear layer's forward as one Triton GEMM (``algorithms/lowrank_gemm.py``), run in Triton's
interpreter: the kernel against float64 math (ragged shapes — partial tiles on every edge, several tiles per
persistent program, row blocks past one L2 group —, ranks below the padded width, bias or none, h written into a
column slice of a wider tensor and nowhere else), what it refuses, and the bypass op and the q/k/v group taking it:
outputs and every gradient against dense float64 math, and the same results with it switched off."""

import pytest
import torch
import torch.nn as nn

import lyco
from lyco.algorithms import lowrank, lowrank_gemm, lowrank_shared


def _operands(m, k, n, r, bias, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x, w, d, u = (torch.randn(*sh, generator=g).to(dtype) for sh in ((m, k), (n, k), (r, k), (n, r)))
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b, d, u


def _reference(x, w, b, d, u, s):
    h = x.double() @ d.double().t()
    y = x.double() @ w.double().t() + s * h @ u.double().t()
    return (y if b is None else y + b.double()), h


@pytest.mark.parametrize("cfg", ["default", "small"])
@pytest.mark.parametrize("m,k,n,r,bias", [(200, 160, 264, 16, True), (70, 96, 72, 8, False),
                                          (300, 64, 136, 32, True)])
def test_kernel_matches_float64(triton_interpreter, monkeypatch, cfg, m, k, n, r, bias):
    if cfg == "small":  # 32-row tiles: up to 10 row blocks (past GROUP_M = 8), several tiles per program
        monkeypatch.setattr(lowrank_gemm, "_CFG_SMALL", (32, 32, 32, 2, 4))
    x, w, b, d, u = _operands(m, k, n, r, bias, m + k + n + r)
    hbuf = torch.full((m, r + 8), float("nan"))
    y, h = lowrank_gemm.fused_linear(x, w, b, d, u, 0.7, hbuf[:, 8:])
    ry, rh = _reference(x, w, b, d, u, 0.7)
    assert h.data_ptr() == hbuf[:, 8:].data_ptr() and y.shape == (m, n)
    torch.testing.assert_close(h.double(), rh, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-4)
    assert torch.isnan(hbuf[:, :8]).all()  # nothing written outside h's columns


def test_configuration_from_the_environment(triton_interpreter, monkeypatch):
    monkeypatch.setenv("LYCO_FUSED_GEMM_CFG", "64,64,32,2,4/32,64,32,2,4")
    assert lowrank_gemm._config(20000) == (64, 64, 32, 2, 4) and lowrank_gemm._config(100) == (32, 64, 32, 2, 4)
    x, w, b, d, u = _operands(100, 96, 80, 16, True, 9)
    y, h = lowrank_gemm.fused_linear(x, w, b, d, u, 0.25)
    ry, rh = _reference(x, w, b, d, u, 0.25)
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-4)
    monkeypatch.setenv("LYCO_FUSED_GEMM_CFG", "64,64,32")
    with pytest.raises(ValueError, match="LYCO_FUSED_GEMM_CFG='64,64,32'"):
        lowrank_gemm._config(100)


def test_kernel_without_h_given(triton_interpreter):
    x, w, b, d, u = _operands(48, 32, 40, 8, True, 5)
    y, h = lowrank_gemm.fused_linear(x, w, b, d, u, -1.5)
    ry, rh = _reference(x, w, b, d, u, -1.5)
    torch.testing.assert_close(h.double(), rh, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-4)


def test_supports_refuses_what_tma_cannot_address():
    x, w, b, d, u = _operands(48, 32, 40, 8, True, 1)
    assert lowrank_gemm.supports(x, w, b, d, u)
    assert not lowrank_gemm.supports(x[:, :30], w[:, :30], b, d[:, :30], u)  # rows of 120 bytes: not 16-aligned
    assert not lowrank_gemm.supports(x.t().contiguous().t(), w, b, d, u)  # columns not unit-strided
    assert not lowrank_gemm.supports(x, w.double(), b, d, u)  # mixed dtypes
    assert not lowrank_gemm.supports(x, w, b, d, u[:, :4])  # U's rank is not D's
    assert not lowrank_gemm.supports(x, w, b, d, u, torch.empty(48, 12)[:, 1:9])  # h starts off 16 bytes
    big = _operands(48, 32, 40, 72, False, 2)
    assert not lowrank_gemm.supports(*big)  # rank above MAX_RANK
    assert not lowrank_gemm.usable(x)  # the CPU: the kernel runs only where TMA exists (the interpreter is for tests)


class _Attn(nn.Module):
    """diffusers' naming (its q, k and v read one input: one group), then a projection of its own."""

    def __init__(self, d=16, o=24):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.is_cross_attention = False
        self.proj = nn.Linear(d, o)

    def forward(self, x):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v)


def _run(model, net, x):
    """Output, ∂x and every trainable parameter's gradient of ``Σ y²``."""
    for p in net.trainable_parameters():
        p.grad = None
    xr = x.detach().clone().requires_grad_(True)
    y = model[0](xr)
    y.square().sum().backward()
    return y.detach(), xr.grad, {n: p.grad.clone() for n, p in net.named_parameters()}


def _dense(model, net, x):
    """The same function in float64 from each layer's merged weight W + (α/r)·U·D (a graph of its own)."""
    att = model[0]
    params = dict(net.named_parameters())
    leaves = {n: p.detach().double().clone().requires_grad_(True) for n, p in params.items()}

    def proj(name, t):
        lin = getattr(att, name)
        d = leaves[f"layers.model__0__{name}.params.lora_down__weight"]
        u = leaves[f"layers.model__0__{name}.params.lora_up__weight"]
        w = lin.weight.detach().double() + 0.5 * (u @ d)
        return t @ w.t() + lin.bias.detach().double()

    xr = x.detach().double().clone().requires_grad_(True)
    q, k, v = proj("to_q", xr), proj("to_k", xr), proj("to_v", xr)
    y = proj("proj", torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v)
    y.square().sum().backward()
    return y.detach(), xr.grad, {n: leaves[n].grad for n in params}


def test_op_and_group_take_the_kernel_and_match_dense_math(triton_interpreter, monkeypatch):
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setenv("LYCO_SHARED_INPUT", "1")
    monkeypatch.setattr(lowrank, "_FUSED_ROWS", 1)  # the tiny layers' 48 rows count as many
    monkeypatch.setattr(lowrank_gemm, "usable", lambda x: True)  # the interpreter stands in for a Hopper GPU
    calls = []
    real = lowrank_gemm.fused_linear

    def counted(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(lowrank_gemm, "fused_linear", counted)
    monkeypatch.setattr(lowrank_shared, "fused_linear", counted)
    torch.manual_seed(0)
    model = nn.Sequential(_Attn())
    net = lyco.create(model, preset="full", algo="lora", rank=8, alpha=4, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randn(2, 24, 16)
    results = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("LYCO_FUSED_GEMM", mode)
        calls.clear()
        results[mode] = _run(model, net, x)
        assert len(calls) == (4 if mode == "1" else 0)  # q, k, v (the group) and proj
    ry, rgx, rgp = _dense(model, net, x)
    for mode, (y, gx, gp) in results.items():
        torch.testing.assert_close(y.double(), ry, rtol=1e-4, atol=1e-4, msg=f"y, fused {mode}")
        torch.testing.assert_close(gx.double(), rgx, rtol=1e-4, atol=1e-4, msg=f"dx, fused {mode}")
        for n, g_ in gp.items():
            torch.testing.assert_close(g_.double(), rgp[n], rtol=1e-4, atol=1e-4, msg=f"{n}, fused {mode}")


def test_shape_rule_takes_only_the_measured_shapes(monkeypatch):
    """``lowrank._fused_gemm``: many rows over narrow layers and low ranks only (the shapes runs 132 and 160 measured faster),
    and only where the switch is on and the kernel usable."""
    from lyco.algorithms.base import LINEAR, LayerSpec
    monkeypatch.setenv("LYCO_FUSED_GEMM", "1")
    monkeypatch.setattr(lowrank_gemm, "usable", lambda x: True)

    def takes(rows, i, o, r=16):
        spec = LayerSpec(kind=LINEAR, weight_shape=(o, i), has_bias=True)
        return lowrank._fused_gemm(torch.empty(rows, i), spec, r)

    assert takes(32768, 320, 320) and takes(8192, 640, 640) and takes(32768, 1280, 320)
    # run 160's shapes of SD1.5 b1 and SDXL: down to 1024 rows, inputs up to 2560
    assert takes(4096, 320, 320) and takes(1024, 640, 640) and takes(16384, 2560, 640) and takes(8192, 2560, 640)
    assert not takes(1023, 640, 640)  # rows below the rule
    assert not takes(2048, 1280, 1280) and not takes(4096, 1280, 1280)  # 1280 outputs: no gain measured
    assert not takes(8192, 640, 5120)  # a GEGLU projection: the [x | h] form stays
    assert not takes(4096, 5120, 1280) and not takes(8192, 5120, 640)  # inputs wider than measured (1.23× at 5120)
    assert not takes(32768, 320, 320, r=64)  # LoHa's Khatri–Rao rank
    monkeypatch.setenv("LYCO_FUSED_GEMM", "0")
    assert not takes(32768, 320, 320)
    monkeypatch.setenv("LYCO_FUSED_GEMM", "1")
    monkeypatch.setattr(lowrank_gemm, "usable", lambda x: False)
    assert not takes(32768, 320, 320)

"""(IA)³'s output mode keeping the output (``ia3._KeepOutput``) and its channel-gradient kernels
(``scale_triton``, run in Triton's interpreter): against float64 definitions written here —
``y = x·(W ⊙ (1 + m·w))ᵀ + b`` and ``∂w = m·Σ_n ∂y ⊙ (x·Wᵀ)`` by autograd in float64 — never against lyco's other path."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lyco
from lyco.algorithms import graph_policy, ia3, rebuild, scale_triton
from regen_helpers import kept_by_forward


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.fixture()
def keep(monkeypatch):
    """The path forced on for every width (the CPU takes the torch form of the gradient), W′ built (change 129's
    output-scale form is chosen per test)."""
    monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT", "1")
    monkeypatch.setenv("LYCO_IA3_SCALE_OUTPUT", "0")
    monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT_MIN_IN", "0")


def _model(bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 24, bias=bias)).to(dtype)
    net = lyco.create(model, algo="ia3", seed=0)
    (layer,) = net.layers.values()
    with torch.no_grad():
        layer.params["weight"].copy_(0.4 * torch.randn(24, generator=g))
    return model, net, layer


def _reference(model, layer, x, m):
    """float64: the layer's definition with w a leaf, autograd throughout."""
    lin = model[0]
    w = layer.params["weight"].detach().double().clone().requires_grad_()
    xr = x.detach().double().clone().requires_grad_()
    W = lin.weight.double() * (1 + m * w)[:, None]
    y = xr @ W.t() + (lin.bias.double() if lin.bias is not None else 0)
    return y, xr, w


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m", [1.0, 0.7])
@pytest.mark.parametrize("lead,scale", [((30,), "0"), ((3, 10), "0"), ((30,), "1"), ((3, 10), "1"), ((60,), "1"),
                                        ((90,), "1")])
def test_keep_output_matches_definition(keep, monkeypatch, bias, m, lead, scale):
    """Both forms: W′ built (``scale`` 0), or the output scaled and ∂y scaled for ∂x on the frozen W (change 129:
    forward where rows < in = 40, backward where rows < 80 — 30 rows both, 60 backward only, 90 neither)."""
    monkeypatch.setenv("LYCO_IA3_SCALE_OUTPUT", scale)
    model, net, layer = _model(bias)
    net.set_multiplier(m)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, 40, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(*lead, 24, generator=g, dtype=torch.float64)
    calls, cols, builds = [], [], []
    orig = ia3._KeepOutput.apply
    monkeypatch.setattr(ia3._KeepOutput, "apply", lambda *a: calls.append(1) or orig(*a))
    orig_cols, orig_rows = scale_triton.scale_cols_torch, scale_triton.scale_rows_torch
    monkeypatch.setattr(scale_triton, "scale_cols_torch", lambda *a: cols.append(1) or orig_cols(*a))
    monkeypatch.setattr(scale_triton, "scale_rows_torch", lambda *a: builds.append(1) or orig_rows(*a))
    y = model(x)
    assert calls, "the layer did not take the output-keeping op"
    rows = x.numel() // 40
    assert (cols, builds) == (([1], []) if scale == "1" and rows < 40 else ([], [1]))
    y.backward(gy)
    assert len(builds) == (1 if scale == "0" or rows >= 40 else 0) + (1 if scale == "0" or rows >= 80 else 0)
    ref, xr, w = _reference(model, layer, x, m)
    ref.backward(gy)
    assert _rel(y, ref) < 1e-12
    assert _rel(x.grad, xr.grad) < 1e-12
    assert _rel(layer.params["weight"].grad, w.grad) < 1e-10


def test_keep_output_saves_the_output_not_the_input(keep):
    """The op keeps y (which the next layer here keeps anyway) and no tensor of x's size."""
    model, net, layer = _model()
    x = torch.randn(64, 40, dtype=torch.float64, requires_grad=True)
    y, acts = kept_by_forward(lambda: model(x), 64 * 24)
    assert [t.data_ptr() for t in acts] == [y.data_ptr()], [tuple(t.shape) for t in acts]


def test_keep_output_rule(monkeypatch):
    """Narrow inputs, the switch off, a trainable base weight: the rebuilt op (which keeps x)."""
    monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT", "1")
    spec_wide = lyco.algorithms.base.LayerSpec(kind=lyco.algorithms.base.LINEAR, weight_shape=(24, 512))
    spec_narrow = lyco.algorithms.base.LayerSpec(kind=lyco.algorithms.base.LINEAR, weight_shape=(24, 511))
    w_wide, w_narrow = torch.zeros(24, 512), torch.zeros(24, 511)
    x = torch.zeros(2, 512)
    assert ia3._keep_output(x, spec_wide, w_wide, None)
    assert not ia3._keep_output(x[:, :511], spec_narrow, w_narrow, None)
    assert not ia3._keep_output(x, spec_wide, w_wide.requires_grad_(), None)
    monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT", "0")
    assert not ia3._keep_output(x, spec_wide, torch.zeros(24, 512), None)
    monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT", "graph")  # the default: captured steps only
    assert not ia3._keep_output(x, spec_wide, torch.zeros(24, 512), None)
    with graph_policy.graph_step():
        assert ia3._keep_output(x, spec_wide, torch.zeros(24, 512), None)
    monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT", "1")
    monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT_MIN_IN", "wide")
    with pytest.raises(ValueError, match="LYCO_IA3_KEEP_OUTPUT_MIN_IN='wide'"):
        ia3._keep_output(x, spec_wide, torch.zeros(24, 512), None)
    monkeypatch.delenv("LYCO_IA3_KEEP_OUTPUT_MIN_IN")
    # a layer the rule leaves out goes through the rebuilt op
    monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT", "0")
    model, net, layer = _model()
    seen = []
    orig = rebuild._RebuiltOp.apply
    monkeypatch.setattr(rebuild._RebuiltOp, "apply", lambda *a: seen.append(1) or orig(*a))
    model(torch.randn(4, 40, dtype=torch.float64))
    assert seen


def test_keep_output_clamps_a_switched_off_channel(keep):
    """A channel whose scale 1 + m·w is within 2⁻⁶ of zero: its gradient is the exact one times d/2⁻⁶ (the doc's
    decision), finite; the other channels exact."""
    model, net, layer = _model(bias=False)
    with torch.no_grad():
        layer.params["weight"][3] = -1.0 + 2.0 ** -8  # d = 2⁻⁸
        layer.params["weight"][5] = -1.0  # d = 0
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 40, generator=g, dtype=torch.float64)
    gy = torch.randn(30, 24, generator=g, dtype=torch.float64)
    model(x).backward(gy)
    ref, xr, w = _reference(model, layer, x, 1.0)
    ref.backward(gy)
    got, exact = layer.params["weight"].grad, w.grad
    assert torch.isfinite(got).all()
    assert abs(got[3] - exact[3] * 2.0 ** -8 / 2.0 ** -6) < 1e-12 * exact.abs().max()
    assert abs(got[5]) < 1e-12 * exact.abs().max()  # y − b is exactly 0 there
    others = [c for c in range(24) if c not in (3, 5)]
    assert _rel(got[others], exact[others]) < 1e-10


@pytest.fixture(scope="module")
def kern(triton_interpreter):
    from lyco.algorithms import lowrank_triton
    assert lowrank_triton._UPCAST, "Triton was imported before tests/conftest.py set TRITON_INTERPRET"
    yield scale_triton


@pytest.mark.parametrize("n,c,bias", [(1000, 200, True), (77, 33, False), (64, 64, True), (5, 300, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_grad_kernel_matches_definition(kern, n, c, bias, dtype):
    """``m·Σ_n ∂y·(y − b) / d`` in float64 from the same stored values; ragged row and column blocks, several row
    blocks per program, a strided ∂y, w in fp32 and the result in its dtype; a clamped channel."""
    g = torch.Generator().manual_seed(n + c)
    gy = torch.randn(n, c + 3, generator=g).to(dtype)[:, 3:]
    y = torch.randn(n, c, generator=g).to(dtype)
    b = torch.randn(c, generator=g).to(dtype) if bias else None
    w = 0.3 * torch.randn(c, generator=g)
    w[c // 2] = -1 / 0.7 + 1e-3  # |d| < 2⁻⁶
    got = kern.channel_grad(gy, y, b, w, 0.7)
    assert got.dtype == w.dtype and got.shape == w.shape
    v = y.double() - (b.double() if bias else 0)
    d = 1 + 0.7 * w.double()
    d = torch.where(d.abs() < 2.0 ** -6, torch.sign(d) * 2.0 ** -6, d)
    ref = 0.7 * (gy.double() * v).sum(0) / d
    assert _rel(got, ref) < 1e-5  # fp32 sums of exact products: only the order differs


def test_keep_output_under_autocast(keep):
    """The trainer's mixed precision: fp32 model and adapter, bf16 autocast, an fp32 input — the op's GEMMs in bf16,
    the gradients back in their tensors' dtypes, within bf16 rounding of the float64 definition."""
    model, net, layer = _model(dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 40, generator=g, requires_grad=True)
    gy = torch.randn(50, 24, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().backward(gy)
    assert x.grad.dtype == torch.float32 and layer.params["weight"].grad.dtype == torch.float32
    ref, xr, w = _reference(model, layer, x, 1.0)
    ref.backward(gy.double())
    assert _rel(y, ref) < 2e-2 and _rel(x.grad, xr.grad) < 2e-2
    assert _rel(layer.params["weight"].grad, w.grad) < 2e-2


@pytest.mark.parametrize("shape", [(300, 77), (40, 8, 3, 3), (5, 3)])
@pytest.mark.parametrize("wdt,s", [(torch.float32, 0.5), (torch.bfloat16, 1.0), (torch.bfloat16, -2.0)])
def test_scale_rows_kernel_matches_definition(kern, shape, wdt, s):
    """``W + W ⊙ c`` per row, ``c = s·w`` in w's dtype then W's (bf16), against the exact value in float64 (a product of
    two bf16 values and its sum with W are exact there): within one unit in W's last place of it — the interpreter
    truncates to bf16 where the GPU rounds, so c is made exact in bf16 (w drawn in bf16, s a power of two) and only
    W′'s own rounding is left; ragged last block (the block size lowered so that a weight spans several programs),
    a conv's 4-D weight, w in fp32 and bf16. Torch's form against the same definition (its rounding is the GPU's)."""
    saved = dict(kern._BUILD_CFG)
    kern._BUILD_CFG.update(BLOCK=256)
    try:
        g = torch.Generator().manual_seed(sum(shape))
        w = torch.randn(shape, generator=g).to(torch.bfloat16)
        wv = (0.3 * torch.randn(shape[0], generator=g)).to(torch.bfloat16).to(wdt)
        got = kern.scale_rows(w, wv, s)
    finally:
        kern._BUILD_CFG.clear()
        kern._BUILD_CFG.update(saved)
    assert got.dtype == w.dtype and got.shape == w.shape
    c = (wv.double() * s).reshape((-1,) + (1,) * (w.dim() - 1))
    exact = w.double() + w.double() * c
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact)[1] - 8)  # bf16: 8 significant bits
    assert ((got.double() - exact).abs() <= ulp).all()
    assert (got.double() - exact).abs().max() > 0  # the rounding is W′'s own: the test sees it
    tref = kern.scale_rows_torch(w, wv, s)
    assert torch.equal(tref, exact.to(torch.bfloat16))


@pytest.mark.parametrize("keep_output", [True, False])
def test_kept_weight_gives_the_same_gradients(monkeypatch, keep_output):
    """``LYCO_IA3_KEEP_WEIGHT_MAX``: an output-mode op keeps its forward's W′ for the backward's ∂x where the weight is
    that small (one weight-sized tensor more among the saved ones, W ⊙ (1 + w) by value), else builds it again — the
    same gradients bit for bit either way; on the output-keeping op and on the rebuilt op; a bad value is an error."""
    monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT", "1" if keep_output else "0")
    monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT_MIN_IN", "0")
    model, net, layer = _model(dtype=torch.float32)
    x = torch.randn(30, 40, requires_grad=True)
    gy = torch.randn(30, 24)
    out = {}
    for cap in ("0", str(24 * 40)):
        monkeypatch.setenv("LYCO_IA3_KEEP_WEIGHT_MAX", cap)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = model(x)
        out[cap] = torch.autograd.grad(y, [x, layer.params["weight"]], gy)
        want = model[0].weight * (1 + layer.params["weight"].detach())[:, None]
        kept_w = [t for t in saved if t.shape == (24, 40) and t.data_ptr() != model[0].weight.data_ptr()]
        assert len(kept_w) == (0 if cap == "0" else 1)
        if kept_w:
            assert torch.allclose(kept_w[0], want, rtol=1e-6, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(out["0"], out[str(24 * 40)]))
    monkeypatch.setenv("LYCO_IA3_KEEP_WEIGHT_MAX", "all")
    with pytest.raises(ValueError, match="LYCO_IA3_KEEP_WEIGHT_MAX='all'"):
        model(x)


@pytest.mark.parametrize("n,c,k", [(1000, 200, 77), (77, 33, 300), (5, 300, 8)])
@pytest.mark.parametrize("s", [1.0, 0.7])
def test_finish_launch_builds_the_weight_too(kern, n, c, k, s):
    """Change 122: :func:`channel_grad` / :func:`channel_finish` given W return ``(∂w, W′)`` from one last launch —
    ∂w the same bits as without W, W′ the same bits as :func:`scale_rows` (the same per-program code; ragged blocks:
    W′'s programs after ∂w's, a weight spanning several)."""
    saved = dict(kern._BUILD_CFG)
    kern._BUILD_CFG.update(BLOCK=256)
    try:
        g = torch.Generator().manual_seed(n + c)
        gy = torch.randn(n, c, generator=g).to(torch.bfloat16)
        y = torch.randn(n, c, generator=g).to(torch.bfloat16)
        b = torch.randn(c, generator=g).to(torch.bfloat16)
        w = 0.3 * torch.randn(c, generator=g)
        W = torch.randn(c, k, generator=g).to(torch.bfloat16)
        alone = kern.channel_grad(gy, y, b, w, s)
        both = kern.channel_grad(gy, y, b, w, s, W)
        rows = kern.scale_rows(W, w, s)
        part = torch.randn(7, c, generator=g)
        fin, fin_w = kern.channel_finish(part, w, s, W)
    finally:
        kern._BUILD_CFG.clear()
        kern._BUILD_CFG.update(saved)
    assert torch.equal(both[0], alone) and torch.equal(both[1], rows)
    assert torch.equal(fin, kern.channel_finish(part, w, s)) and torch.equal(fin_w, rows)
    ref = (s * part.double().sum(0) / (1 + s * w.double()))
    assert _rel(fin, ref) < 1e-5


def _conv_model(bias=True, dtype=torch.float64, seed=0, **conv):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(20, 12, 1, bias=bias, **conv)).to(dtype)
    net = lyco.create(model, algo="ia3", seed=0, preset="full")
    (layer,) = net.layers.values()
    with torch.no_grad():
        layer.params["weight"].copy_(0.4 * torch.randn(layer.params["weight"].shape, generator=g))
    return model, net, layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m", [1.0, 0.7])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "grad_channels_last"])
def test_keep_output_conv_matches_definition(keep, monkeypatch, bias, m, layout):
    """Change 123: a 1×1 conv on :class:`ia3._KeepOutputConv` — y, ∂x and ∂w against ``y = conv(x, W ⊙ (1 + m·w)) + b``
    by autograd in float64, x NCHW or channels-last, ∂y NCHW or channels-last (the transformer's reshape hands
    proj_in's gradient back that way); y is what it keeps, not x."""
    monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT_CONV", "1")
    model, net, layer = _conv_model(bias)
    net.set_multiplier(m)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, 5, 7, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    gy = torch.randn(3, 12, 5, 7, generator=g, dtype=torch.float64)
    if layout == "grad_channels_last":
        gy = gy.contiguous(memory_format=torch.channels_last)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    assert type(y.grad_fn).__name__ == "_KeepOutputConvBackward"
    assert not any(t.data_ptr() == x.data_ptr() for t in saved)
    gx, gw = torch.autograd.grad(y, [x, layer.params["weight"]], gy)
    conv = model[0]
    w = layer.params["weight"].detach().double().clone().reshape(-1).requires_grad_()
    xr = x.detach().double().clone().requires_grad_()
    W = conv.weight.double() * (1 + m * w)[:, None, None, None]
    yr = torch.nn.functional.conv2d(xr, W, conv.bias.double() if bias else None)
    rx, rw = torch.autograd.grad(yr, [xr, w], gy)
    assert _rel(y, yr) < 1e-12 and _rel(gx, rx) < 1e-12
    assert _rel(gw.reshape(-1), rw) < 1e-10


def test_keep_output_conv_rule(monkeypatch):
    """Only a pointwise conv (1×1, stride 1, no padding, one group) and only with the switch on."""
    monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT", "1")
    x = torch.randn(2, 20, 6, 6, dtype=torch.float64)
    for conv, sw, taken in (({}, "1", True), ({}, "0", False), (dict(stride=2), "1", False),
                            (dict(padding=1), "1", False)):
        monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT_CONV", sw)
        model, net, layer = _conv_model(**conv)
        y = model(x.requires_grad_())
        assert (type(y.grad_fn).__name__ == "_KeepOutputConvBackward") == taken, (conv, sw)


@pytest.mark.parametrize("b,c,n", [(3, 37, 50), (8, 70, 300), (1, 5, 1000)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
@pytest.mark.parametrize("bias", [True, False])
def test_channel_grad_bcl_kernel_matches_definition(kern, b, c, n, layout, bias):
    """:func:`channel_grad_bcl` in the interpreter: ``s·Σ_{b,l} ∂y·(y − bias) / d`` against float64 from the same
    stored values; positions contiguous, channels contiguous, or one of each; ragged channel and position blocks."""
    g = torch.Generator().manual_seed(b + c + n)

    def t(cl):
        v = torch.randn(b, n, c, generator=g).transpose(1, 2) if cl else torch.randn(b, c, n, generator=g)
        return v.to(torch.bfloat16)
    gy, y = t(layout != "contiguous"), t(layout == "channels_last")
    bb = torch.randn(c, generator=g).to(torch.bfloat16) if bias else None
    w = 0.3 * torch.randn(c, generator=g)
    got = kern.channel_grad_bcl(gy, y, bb, w, 0.7)
    v = y.double() - (bb.double()[:, None] if bias else 0)
    ref = 0.7 * (gy.double() * v).sum((0, 2)) / (1 + 0.7 * w.double())
    assert _rel(got, ref) < 1e-5
    assert _rel(kern.channel_grad_bcl_torch(gy, y, bb, w, 0.7), ref) < 1e-5


def test_keep_output_conv_under_autocast(keep, monkeypatch):
    """The trainer's mixed precision on the pointwise conv's op: fp32 model and adapter, bf16 autocast, an fp32 input —
    the gradients back in their tensors' dtypes, within bf16 rounding of the float64 definition."""
    monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT_CONV", "1")
    model, net, layer = _conv_model(dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 20, 6, 5, generator=g, requires_grad=True)
    gy = torch.randn(2, 12, 6, 5, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__ == "_KeepOutputConvBackward"
    y.float().backward(gy)
    assert x.grad.dtype == torch.float32 and layer.params["weight"].grad.dtype == torch.float32
    conv = model[0]
    w = layer.params["weight"].detach().double().reshape(-1).clone().requires_grad_()
    xr = x.detach().double().clone().requires_grad_()
    yr = torch.nn.functional.conv2d(xr, conv.weight.double() * (1 + w)[:, None, None, None], conv.bias.double())
    yr.backward(gy.double())
    assert _rel(y, yr) < 2e-2 and _rel(x.grad, xr.grad) < 2e-2
    assert _rel(layer.params["weight"].grad.reshape(-1), w.grad) < 2e-2


@pytest.mark.parametrize("n,c,bias", [(77, 300, True), (1000, 33, False), (5, 128, True)])
@pytest.mark.parametrize("s", [1.0, 0.7])
def test_scale_cols_kernel_matches_definition(kern, n, c, bias, s):
    """Change 129's forward pass ``y = z ⊙ (1 + s·w) + b`` over z in place: within one unit in y's last place of the
    float64 value from the same stored z, w and b (the interpreter truncates where the GPU rounds); ragged tiles."""
    g = torch.Generator().manual_seed(n + c)
    z = torch.randn(n, c, generator=g).to(torch.bfloat16)
    w = 0.3 * torch.randn(c, generator=g)
    b = torch.randn(c, generator=g).to(torch.bfloat16) if bias else None
    exact = z.double() * (1 + s * w.double()) + (b.double() if bias else 0)
    zc = z.clone()
    got = kern.scale_cols(zc, w, s, b)
    assert got.data_ptr() == zc.data_ptr() and got.dtype == torch.bfloat16
    # one unit of y, plus fp32's roundings of the terms before they cancel (2⁻²³ of each, twice)
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact)[1] - 8)
    slack = 2.0 ** -22 * ((z.double() * (1 + s * w.double())).abs() + (b.double().abs() if bias else 0))
    assert ((got.double() - exact).abs() <= ulp + slack).all()
    tref = kern.scale_cols_torch(z, w, s, b)  # torch's: fp32 math rounded to nearest
    assert ((tref.double() - exact).abs() <= ulp / 2 + slack).all()
    assert (got.double() - exact).abs().max() > 0  # the test sees the rounding


@pytest.mark.parametrize("n,c", [(1000, 200), (77, 33)])
def test_scaled_channel_grad_writes_the_scaled_gradient(kern, n, c):
    """Change 129's backward: the channel pass also writes ``∂y ⊙ (1 + s·w)`` (unclamped) — within one unit in its
    last place of the float64 value, a strided ∂y — and ∂w is the same bits as without it."""
    g = torch.Generator().manual_seed(n)
    gy = torch.randn(n, c + 3, generator=g).to(torch.bfloat16)[:, 3:]
    y = torch.randn(n, c, generator=g).to(torch.bfloat16)
    b = torch.randn(c, generator=g).to(torch.bfloat16)
    w = 0.3 * torch.randn(c, generator=g)
    w[1] = -1.0 / 0.7  # d = 0: the clamp is the division's only, the scaled ∂y is exactly 0 there
    gw, gs = kern.channel_grad(gy, y, b, w, 0.7, scaled=True)
    assert torch.equal(gw, kern.channel_grad(gy, y, b, w, 0.7))
    exact = gy.double() * (1 + 0.7 * w.double())
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact)[1] - 8)
    slack = 2.0 ** -22 * gy.double().abs() * (1 + 0.7 * w.double().abs())  # d's own fp32 rounding
    assert gs.is_contiguous() and ((gs.double() - exact).abs() <= ulp + slack).all()
    assert (gs[:, 1].double().abs() < 1e-6).all()


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_output_scale_form_on_real_models(keep, monkeypatch, kind):
    """Change 129 on the tiny U-Nets and text encoders in float64 (every layer keeping its output, the layers with
    fewer rows than inputs scaling their output and ∂y): the loss and every gradient equal to the W′-building form's.
    (The GEGLU-fused ``ff.net.2`` and the GEGLU's column sums need CUDA: the GPU run's gradient check covers them.)"""
    from lyco.models.tiny import tiny_components
    from regen_helpers import tiny_sdxl_loss, tiny_sdxl_step_inputs

    def step(scale):
        monkeypatch.setenv("LYCO_IA3_SCALE_OUTPUT", scale)
        comps = tiny_components(kind, seed=0, dtype=torch.float64)
        net = lyco.create(comps, algo="ia3", preset="full", seed=0)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in net.trainable_parameters():
                p.add_(0.4 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        cols = []
        orig = scale_triton.scale_cols_torch
        monkeypatch.setattr(scale_triton, "scale_cols_torch", lambda *a: cols.append(1) or orig(*a))
        if kind == "sdxl":
            ids, inputs = tiny_sdxl_step_inputs(comps, g)
            loss = tiny_sdxl_loss(comps, ids, inputs)
        else:
            unet, te = comps["unet"], comps["text_encoder"]
            ids = torch.randint(0, te.config.vocab_size, (1, 12), generator=g)
            lat = torch.randn(1, unet.config.in_channels, 8, 8, generator=g, dtype=torch.float64)
            loss = unet(lat, torch.tensor([10]), te(ids)[0]).sample.square().mean()
        loss.backward()
        monkeypatch.setattr(scale_triton, "scale_cols_torch", orig)
        return loss.detach(), {k: p.grad for k, p in net.named_parameters()}, len(cols)

    l0, g0, n0 = step("0")
    l1, g1, n1 = step("1")
    assert n0 == 0 and n1 > 5
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-9, atol=1e-14, msg=k)

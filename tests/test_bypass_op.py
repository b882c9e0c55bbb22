"""The low-rank bypass op (``algorithms/lowrank.py``: exact forward ``f(x) + s·U·(D∗x)``, ∂x through the merged
weight, a conv's ∂D as one batched GEMM over the shifted copies of ∂h) against independent float64 math, and
the captured-steps policy that selects it (``LYCO_BYPASS_OP``)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lyco
from lyco.algorithms import graph_policy, lowrank
from lyco.algorithms.base import LayerSpec

CONVS = {
    "3x3-p1": dict(kernel_size=3, padding=1),
    "3x3-p0": dict(kernel_size=3, padding=0),
    "3x3-p2": dict(kernel_size=3, padding=2),
    "3x5-p12": dict(kernel_size=(3, 5), padding=(1, 2)),
    "1x1": dict(kernel_size=1),
    "3x3-s2": dict(kernel_size=3, stride=2, padding=1),     # ∂D by the conv's own weight gradient
    "3x3-d2": dict(kernel_size=3, dilation=2, padding=2),   # likewise
    "3x3-p3": dict(kernel_size=3, padding=3),               # padding > k − 1: likewise
}


@pytest.fixture(autouse=True)
def _lokr_lora_form(monkeypatch):
    """These tiny layers are narrow enough for LoKr's weight-gradient rule to send them to the rebuilt op in the
    op's steps under ``mode="auto"`` (``LoKr.prefers_rebuild_in_op``, tested in test_lokr_lowrank.py): off, so
    LoKr takes the op here."""
    from lyco.algorithms.lokr import LoKr
    monkeypatch.setattr(LoKr, "WGRAD_PER_H", 0.0)


def _dense_delta(algo, t):
    """ΔW without the layer's shape, from the file tensors, in float64 — written here from the formulas."""
    if algo == "lokr":
        return _dense_lokr(t)
    if algo == "lora":
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        g = float(t["alpha"]) / down.shape[0]
        if "scalar" in t:
            g = g * t["scalar"]
        return g * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
    a1, b1, a2, b2 = (t[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    g = float(t["alpha"]) / b1.shape[0]
    return g * (a1 @ b1.reshape(b1.shape[0], -1)) * (a2 @ b2.reshape(b2.shape[0], -1))


def _dense_lokr(t):
    """γ·kron(W1, A·B) of a LoKr with full W1 and low-rank W2, float64, from the definition."""
    g = float(t["alpha"]) / t["lokr_w2_b"].shape[0]
    return g * torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"])


def _setup(mod, cfg, seed=0):
    model = nn.Sequential(mod).double()
    net = lyco.create(model, preset="full", seed=seed, **cfg)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_((0.3 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return model, net


def _adapter_tensors(mod):
    (a,) = mod._lyco_host.adapters
    return a, a.tensors()


def _node(y):
    """The autograd node that made y (through the host's reshape of a 3-D linear input's rows)."""
    fn = y.grad_fn
    if fn is None:
        return None
    if fn.name() in ("ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0"):
        fn = fn.next_functions[0][0]
    return fn.name()


def _run(model, x, gy):
    y = model(x)
    _, t = _adapter_tensors(model[0])
    params = [v for v in t.values() if v.requires_grad]
    grads = torch.autograd.grad(y, [x] + params, gy)
    return y, grads, _node(y)


def _reference(mod, algo, x, gy, m):
    """y = op(x, W + m·ΔW, b) in float64 by plain autograd through the dense ΔW."""
    a, t = _adapter_tensors(mod)
    leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in t.items()}
    xr = x.detach().clone().requires_grad_()
    dw = _dense_delta(algo, leaves).reshape(mod.weight.shape)
    w = mod.weight.detach() + m * dw
    if isinstance(mod, nn.Linear):
        y = F.linear(xr, w, mod.bias)
    else:
        y = F.conv2d(xr, w, mod.bias, mod.stride, mod.padding, mod.dilation)
    params = [leaves[k] for k, v in t.items() if v.requires_grad]
    return y, torch.autograd.grad(y, [xr] + params, gy)


CFGS = {
    "lora": dict(algo="lora", rank=3, alpha=2.0),
    "lora-scalar": dict(algo="lora", rank=3, alpha=2.0, use_scalar=True),
    "loha": dict(algo="loha", rank=2, alpha=1.5),
}


@pytest.mark.parametrize("cfg", list(CFGS))
@pytest.mark.parametrize("layer", ["linear-3d", "linear-2d"] + list(CONVS) + ["3x3-p1@1x1", "3x3-p1/b1", "1x1/b1"])
@pytest.mark.parametrize("m", [1.0, 0.7])
def test_bypass_op_matches_dense_float64(monkeypatch, cfg, layer, m):
    """Every geometry the op takes, whether or not the shape rule would choose it here. ``3x3-p1@1x1``: a 1×1
    input (SD1.5's 8×8 level at the tiny UNet's size), where ∂h is both contiguous and channels-last — the
    im2col once read it with the wrong strides and returned ∂D = 0. ``/b1``: one sample, whose factor gradients are
    one GEMM each instead of a batched GEMM and its batch sum."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    monkeypatch.delenv("LYCO_BYPASS_OP_KINDS", raising=False)
    torch.manual_seed(0)
    if layer.startswith("linear"):
        mod = nn.Linear(12, 10)
        x = torch.randn(2, 5, 12) if layer == "linear-3d" else torch.randn(7, 12)
    else:
        layer, _, one = layer.partition("/")
        geom, _, spatial = layer.partition("@")
        # 20 input channels: the rank·∏k shifted copies of ∂h (LoRA 3·9, LoHa 4·9) within 2·20, so the im2col's ∂D
        mod = nn.Conv2d(20, 16, bias=layer != "1x1", **CONVS[geom])
        n = 1 if one else 2
        x = torch.randn(n, 20, 1, 1) if spatial else torch.randn(n, 20, 7, 9)
    model, net = _setup(mod, CFGS[cfg])
    net.set_multiplier(m)
    x = x.double().requires_grad_()
    gy = torch.randn_like(model(x).detach())
    y, grads, node = _run(model, x, gy)
    assert node == "_BypassOpBackward"  # the op ran
    yr, gr = _reference(mod, CFGS[cfg]["algo"], x, gy, m)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    assert len(grads) == len(gr)
    for g, r in zip(grads, gr):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("m", [1.0, 0.7])
@pytest.mark.parametrize("shape", [(60, 64), (2, 30, 64)])
def test_lokr_linear_takes_the_op_as_a_lora(monkeypatch, m, shape):
    """LoKr with a low-rank W2 on a linear layer: ``kron(I, B)`` and ``kron(W1, A)`` as the op's factors;
    outputs and gradients (x, W1, A, B) equal float64 math on ``kron(W1, A·B)``."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    torch.manual_seed(0)
    mod = nn.Linear(64, 48)
    model, net = _setup(mod, dict(algo="lokr", rank=2, alpha=1.5, factor=4))
    net.set_multiplier(m)
    _, t = _adapter_tensors(mod)
    assert "lokr_w2_a" in t and "lokr_w1" in t
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    gy = torch.randn_like(model(x).detach())
    y, grads, node = _run(model, x, gy)
    assert node == "_BypassOpBackward"
    yr, gr = _reference(mod, "lokr", x, gy, m)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, gr):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


WIDE = {  # (config, in): in + the op's rank a multiple of 8, out = 64 ≥ 2·(in + rank): lowrank._cat_pays holds
    "lora": (dict(algo="lora", rank=3, alpha=2.0), 13),
    "lora-scalar": (dict(algo="lora", rank=3, alpha=2.0, use_scalar=True), 13),
    "loha": (dict(algo="loha", rank=2, alpha=1.5), 12),                 # Khatri–Rao rank 4
    "lokr": (dict(algo="lokr", rank=2, alpha=1.5, factor=4), 16),       # h: in_m·r = 4·2 channels
}


def _saved_input_row_stride(y):
    fn = y.grad_fn
    if fn.name() != "_BypassOpBackward":
        fn = fn.next_functions[0][0]
    return fn.saved_tensors[0].stride(0)


@pytest.mark.parametrize("cfg", list(WIDE))
@pytest.mark.parametrize("shape, cat", [((48,), True), ((2, 24), True), ((9,), False), ((2, 5), False)])
@pytest.mark.parametrize("m", [1.0, 0.7])
def test_wide_linear_concatenated_gemms(monkeypatch, cfg, shape, cat, m):
    """A layer wider out than in takes ``[∂x | ∂h/s] = ∂y·[W′ | U]`` backward (``lowrank._cat_pays``) and, with
    rows·(out − in − r) > out·(in + r) (``lowrank._cat_forward_pays``: over 21 rows for these layers, 38 for LoKr's, out = 64),
    ``y = [x | h]·[W | s·U]ᵀ + b`` forward: outputs and gradients equal float64 math on the dense ΔW on both sides of
    the forward's line. That the forward concatenated is read from what the op kept: x as a view of ``[x | h]``
    (rows in + r apart)."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    conf, n_in = WIDE[cfg]
    torch.manual_seed(0)
    mod = nn.Linear(n_in, 64)
    model, net = _setup(mod, conf)
    net.set_multiplier(m)
    x = torch.randn(*shape, n_in, dtype=torch.float64, requires_grad=True)
    gy = torch.randn_like(model(x).detach())
    y, grads, node = _run(model, x, gy)
    assert node == "_BypassOpBackward"
    stride = _saved_input_row_stride(model(x))
    assert (stride % 8 == 0 and stride > n_in) if cat else stride == n_in
    yr, gr = _reference(mod, conf["algo"], x, gy, m)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, gr):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("m", [1.0, 0.7])
@pytest.mark.parametrize("layer", ["3x3-p1", "3x3-p0", "3x3-s2", "3x3-d2"])
@pytest.mark.parametrize("channels, im2col", [(32, False), (64, True)])
def test_lokr_conv_takes_the_op_with_a_grouped_down(monkeypatch, m, layer, channels, im2col):
    """LoKr with a low-rank W2 on a 3×3 conv: B applied to each of the in_m channel groups inside the op (∂B
    summed over the groups; the im2col where the geometry and the width of h allow — h has in_m·r = 8 channels
    here, 72 shifted planes: within 2·64 input channels, not 2·32 — cuDNN's weight gradient else), the merged
    weight with ``kron(I, B)``; outputs and gradients (x, W1, A, B) equal float64 math on ``kron(W1, A·B)``."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    used = []
    real = lowrank._conv_wgrad_nchw
    monkeypatch.setattr(lowrank, "_conv_wgrad_nchw", lambda *a: used.append(1) or real(*a))
    torch.manual_seed(0)
    mod = nn.Conv2d(channels, 48, **CONVS[layer])
    model, net = _setup(mod, dict(algo="lokr", rank=2, alpha=1.5, factor=4))
    net.set_multiplier(m)
    _, t = _adapter_tensors(mod)
    assert "lokr_w2_a" in t and "lokr_w1" in t and "lokr_t2" not in t
    x = torch.randn(2, channels, 9, 7, dtype=torch.float64, requires_grad=True)
    gy = torch.randn_like(model(x).detach())
    y, grads, node = _run(model, x, gy)
    assert node == "_BypassOpBackward"
    assert bool(used) == (im2col and layer in ("3x3-p1", "3x3-p0"))  # stride 2 / dilation 2: cuDNN's always
    yr, gr = _reference(mod, "lokr", x, gy, m)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, gr):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n_in, n_out, r, taken", [
    (320, 2560, 16, True), (320, 2560, 64, True), (320, 2560, 128, True),   # SD1.5's GEGLU: LoRA, LoHa, LoKr
    (320, 320, 16, False), (1280, 320, 16, False),                           # square, narrowing
    (320, 640, 16, False),                                                   # out < 2·(in + r)
    (321, 2560, 16, False),                                                  # [x | h] rows not 16-byte aligned
])
def test_concatenated_gemms_rule(n_in, n_out, r, taken):
    assert lowrank._cat_pays(LayerSpec.from_module(nn.Linear(n_in, n_out)), r) == taken
    assert not lowrank._cat_pays(LayerSpec.from_module(nn.Conv2d(n_in, n_out, 1)), r)


@pytest.mark.parametrize("n_in, n_out, r, rows, taken", [
    (1280, 10240, 16, 1024, False), (1280, 10240, 16, 1484, True), (1280, 10240, 16, 1483, False),  # SDXL b1
    (1280, 10240, 16, 512, False), (320, 2560, 16, 4096, True), (640, 5120, 16, 1024, True),       # SD1.5
])
def test_concatenated_forward_rows_rule(n_in, n_out, r, rows, taken):
    """The forward's concatenations pay where rows·(out − in − r) > out·(in + r): the weight's copy against the
    in-place up's pass over the output."""
    spec = LayerSpec.from_module(nn.Linear(n_in, n_out))
    assert lowrank._cat_forward_pays(spec, rows, r) == taken


def test_wide_linear_bf16_within_rounding(monkeypatch):
    """In bf16 the concatenated forward rounds once (the delta path twice): output and gradients of both paths
    within bf16 rounding of float64 math on the same values, and the op's output no further from it."""
    torch.manual_seed(0)
    mod = nn.Linear(48, 256)
    model, net = _setup(mod, dict(algo="lora", rank=16, alpha=8.0))
    model.to(torch.bfloat16)
    x = torch.randn(4, 80, 48).bfloat16().requires_grad_()  # 320 rows ≥ 256 outputs: the shapes pay
    gy = torch.randn_like(model(x).detach())
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("LYCO_BYPASS_OP", flag)
        out[flag] = _run(model, x, gy)
    assert out["1"][2] == "_BypassOpBackward" and _saved_input_row_stride(model(x)) == 64
    model.double()
    yr, gr = _reference(mod, "lora", x.detach().double().requires_grad_(), gy.double(), 1.0)
    err = {f: ((o[0].double() - yr).abs().max() / yr.abs().max()).item() for f, o in out.items()}
    assert err["1"] < 1e-2 and err["1"] <= err["0"] * 1.01, err
    for g, r in zip(out["1"][1], gr):
        assert ((g.double() - r).abs().max() / r.abs().max()) < 2e-2


@pytest.mark.parametrize("conv, r, ok", [
    (dict(in_channels=320, kernel_size=3, padding=1), 8, True),       # LoCon rank 8: 72 planes ≤ 640
    (dict(in_channels=320, kernel_size=3, padding=1), 128, False),    # LoKr's h (in_m·r = 128): 1152 > 640
    (dict(in_channels=640, kernel_size=3, padding=1), 128, True),     # 1152 ≤ 1280
    (dict(in_channels=320, kernel_size=3, padding=1, stride=2), 8, False),
    (dict(in_channels=320, kernel_size=3, padding=2, dilation=2), 8, False),
    (dict(in_channels=320, kernel_size=3, padding=3), 8, False),     # padding > k − 1
])
def test_im2col_rule(conv, r, ok):
    assert lowrank._im2col_ok(LayerSpec.from_module(nn.Conv2d(out_channels=16, **conv)), r) == ok


@pytest.mark.parametrize("layer", ["3x3-p1", "3x3-p0", "3x5-p12", "1x1"])
@pytest.mark.parametrize("n", [3, 1])
def test_conv_weight_gradient_by_shifted_copies(layer, n):
    """``_conv_wgrad_nchw`` against torch's own conv weight gradient, float64 (one sample: one GEMM, no batch sum)."""
    conv = nn.Conv2d(5, 4, **CONVS[layer])
    spec = LayerSpec.from_module(conv)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, 8, 6, generator=g, dtype=torch.float64)
    ho, wo = conv(x.float()).shape[2:]
    gh = torch.randn(n, 4, ho, wo, generator=g, dtype=torch.float64)
    ref = torch.nn.grad.conv2d_weight(x, conv.weight.shape, gh, 1, conv.padding)
    got = lowrank._conv_wgrad_nchw(x, gh, spec)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert got.is_contiguous()  # a 2-D parameter's reshape and autograd's accumulation take it without a copy


@pytest.mark.parametrize("layer", ["linear", "3x3-p1"])
def test_bf16_forward_is_the_delta_paths(monkeypatch, layer):
    """In bf16 the op's forward is the delta path's, bit for bit (the same kernels in the same order); its
    gradients are within bf16 rounding of the float64 reference."""
    torch.manual_seed(0)
    mod = nn.Linear(32, 24) if layer == "linear" else nn.Conv2d(8, 16, **CONVS[layer])
    model, net = _setup(mod, CFGS["lora"])
    model.to(torch.bfloat16)
    x = (torch.randn(4, 6, 32) if layer == "linear" else torch.randn(2, 8, 10, 10)).bfloat16().requires_grad_()
    gy = torch.randn_like(model(x).detach())
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("LYCO_BYPASS_OP", flag)
        out[flag] = _run(model, x, gy)
    assert out["1"][2] == "_BypassOpBackward" and out["0"][2] != "_BypassOpBackward"
    assert torch.equal(out["0"][0], out["1"][0])
    model.double()  # the reference in float64 from the same (bf16) weights and adapter values
    _, gr = _reference(mod, "lora", x.detach().double().requires_grad_(), gy.double(), 1.0)
    for g, r in zip(out["1"][1], gr):
        err = (g.double() - r).abs().max() / r.abs().max()
        assert err < 2e-2, err


def _mixed_precision_runs(monkeypatch, mod, model, x):
    """``lyco train``'s mixed precision on one layer: its base in bf16, the adapter in fp32 (as the trainer keeps
    it), forward and backward under CPU autocast on the delta path (``"0"``) and through the op (``"1"``);
    returns ``(∂y, {flag: (y, grads, node)})``."""
    mod.to(torch.bfloat16)
    _, t = _adapter_tensors(mod)
    for v in t.values():
        v.data = v.data.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gy = torch.randn_like(model(x).detach())
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("LYCO_BYPASS_OP", flag)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[flag] = _run(model, x, gy)
    assert out["1"][2] == "_BypassOpBackward" and out["0"][2] != "_BypassOpBackward"
    return gy, out


@pytest.mark.parametrize("layer", ["linear", "3x3-p1"])
def test_autocast_mixed_precision(monkeypatch, layer):
    """``lyco train``'s mixed precision: a bf16 base, fp32 adapter, the step under autocast. The op computes in
    autocast's dtype (bf16 output, as the delta path's), returns each gradient in its input's dtype (fp32 for the
    adapter), and both agree with float64 math to bf16 rounding."""
    torch.manual_seed(0)
    mod = nn.Linear(32, 24) if layer == "linear" else nn.Conv2d(8, 16, **CONVS[layer])
    model, net = _setup(mod, CFGS["lora"])
    x = (torch.randn(4, 6, 32) if layer == "linear" else torch.randn(2, 8, 10, 10)).bfloat16().requires_grad_()
    gy, out = _mixed_precision_runs(monkeypatch, mod, model, x)
    assert out["1"][0].dtype == out["0"][0].dtype == torch.bfloat16
    assert [g.dtype for g in out["1"][1]] == [g.dtype for g in out["0"][1]] == [torch.bfloat16] + [torch.float32] * 2
    mod.double()
    yr, gr = _reference(mod, "lora", x.detach().double().requires_grad_(), gy.double(), 1.0)
    for got in (out["0"], out["1"]):
        assert ((got[0].double() - yr).abs().max() / yr.abs().max()) < 2e-2
        for g, r in zip(got[1], gr):
            assert ((g.double() - r).abs().max() / r.abs().max()) < 2e-2


@pytest.mark.parametrize("layer", ["linear", "linear-wide", "3x3-p1"])
def test_autocast_mixed_precision_lokr_grouped(monkeypatch, layer):
    """As above for LoKr's grouped down (B on each channel group; the merged weight over W's rows in in_m
    blocks), on a linear layer, a wide one (the concatenated GEMMs, ∂B per group from the strided x) and a conv:
    bf16 output, fp32 gradients for W1, A, B, all within bf16 rounding of float64 math on ``kron(W1, A·B)``."""
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    torch.manual_seed(0)
    mod = {"linear": nn.Linear(64, 48), "linear-wide": nn.Linear(16, 64),
           "3x3-p1": nn.Conv2d(64, 48, **CONVS["3x3-p1"])}[layer]
    model, net = _setup(mod, dict(algo="lokr", rank=2, alpha=1.5, factor=4))
    n_in = mod.weight.shape[1]
    # the wide layer with 48 rows: its forward concatenates from 39 on (lowrank._cat_forward_pays)
    x = (torch.randn(4, 12 if layer == "linear-wide" else 6, n_in) if layer.startswith("linear")
         else torch.randn(2, 64, 9, 7)).bfloat16()
    gy, out = _mixed_precision_runs(monkeypatch, mod, model, x.requires_grad_())
    _, t = _adapter_tensors(mod)
    if layer == "linear-wide":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _saved_input_row_stride(model(x)) == 24   # [x | h]: 16 + in_m·r = 16 + 4·2
    assert out["1"][0].dtype == torch.bfloat16
    assert [g.dtype for g in out["1"][1]] == [torch.bfloat16] + [torch.float32] * (len(out["1"][1]) - 1)
    mod.double()
    for v in t.values():  # the reference in float64 from the same values
        v.data = v.data.double()
    yr, gr = _reference(mod, "lokr", x.detach().double().requires_grad_(), gy.double(), 1.0)
    for got in (out["0"], out["1"]):
        assert ((got[0].double() - yr).abs().max() / yr.abs().max()) < 2e-2
        for g, r in zip(got[1], gr):
            assert ((g.double() - r).abs().max() / r.abs().max()) < 2e-2


def test_policy_captured_steps_only_by_default(monkeypatch):
    """Unset/``graph``: the op only inside ``graph_step``; ``0`` never; ``1`` everywhere; the kinds switch;
    never without gradients."""
    monkeypatch.delenv("LYCO_BYPASS_OP", raising=False)
    monkeypatch.delenv("LYCO_BYPASS_OP_KINDS", raising=False)
    torch.manual_seed(0)
    model, net = _setup(nn.Conv2d(4, 6, 3, padding=1), CFGS["lora"])
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)  # 72 positions ≥ 6·9: the shapes pay
    assert _node(model(x)) != "_BypassOpBackward"
    with graph_policy.graph_step():
        assert _node(model(x)) == "_BypassOpBackward"
        with torch.no_grad():
            assert _node(model(x)) is None
        monkeypatch.setenv("LYCO_BYPASS_OP_KINDS", "linear")
        assert _node(model(x)) != "_BypassOpBackward"
        monkeypatch.delenv("LYCO_BYPASS_OP_KINDS")
        monkeypatch.setenv("LYCO_BYPASS_OP", "0")
        assert _node(model(x)) != "_BypassOpBackward"
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    assert _node(model(x)) == "_BypassOpBackward"
    monkeypatch.setenv("LYCO_BYPASS_OP_KINDS", "conv")
    with pytest.raises(ValueError, match="LYCO_BYPASS_OP_KINDS='conv'"):
        model(x)
    monkeypatch.delenv("LYCO_BYPASS_OP_KINDS")
    monkeypatch.setenv("LYCO_BYPASS_OP", "on")
    with pytest.raises(ValueError, match="LYCO_BYPASS_OP='on'"):
        model(x)


@pytest.mark.parametrize("layer, shape, taken", [
    ("linear", (15, 16), False), ("linear", (16, 16), True), ("linear", (2, 8, 16), True),
    ("3x3", (1, 8, 4, 4), False), ("3x3", (2, 8, 3, 3), True), ("3x3", (2, 8, 9, 8), True),
    ("1x1", (1, 8, 3, 5), False), ("1x1", (1, 8, 4, 4), True), ("1x1", (4, 8, 32, 32), True),
])
def test_shape_rule(monkeypatch, layer, shape, taken):
    """Taken where the input has at least out positions on a linear layer or 1×1 conv (16 here), out·∏k/8 on a
    larger kernel (18 for this 3×3 conv) (``lowrank.bypass_pays``: the rule from run 72's per-layer timings)."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    torch.manual_seed(0)
    mod = {"linear": nn.Linear(16, 16), "3x3": nn.Conv2d(8, 16, 3, padding=1), "1x1": nn.Conv2d(8, 16, 1)}[layer]
    model, net = _setup(mod, CFGS["lora"])
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert (_node(model(x)) == "_BypassOpBackward") == taken


@pytest.mark.parametrize("layer, shape, env, streams, taken", [
    ("linear", (3, 16), None, True, True), ("linear", (3, 16), None, False, False),
    ("1x1", (1, 8, 1, 3), None, True, True), ("1x1", (1, 8, 1, 3), None, False, False),
    ("linear", (0, 16), None, True, False),
    ("linear", (7, 16), "0.5", False, False), ("linear", (8, 16), "0.5", False, True),
    ("linear", (7, 16), "0.5", True, False), ("1x1", (1, 8, 2, 4), "0.5", True, True),
    ("linear", (15, 16), "1", True, False), ("linear", (1, 16), "0", False, True),
    ("3x3", (1, 8, 4, 4), "0", True, False),
])
def test_shape_rule_rows_factor(monkeypatch, layer, shape, env, streams, taken):
    """Linear layers and 1×1 convs: positions ≥ c·out (16 outputs here), c = 1 without the side streams and 0 with
    them (``lowrank._rows_factor``: every such layer in captured steps), ``LYCO_BYPASS_ROWS`` over both; a k×k conv
    keeps its own line (out·∏k/8 = 18 positions here)."""
    if env is None:
        monkeypatch.delenv("LYCO_BYPASS_ROWS", raising=False)
    else:
        monkeypatch.setenv("LYCO_BYPASS_ROWS", env)
    monkeypatch.setattr(lowrank, "side_stream", lambda t: object() if streams else None)
    mod = {"linear": nn.Linear(16, 16), "3x3": nn.Conv2d(8, 16, 3, padding=1), "1x1": nn.Conv2d(8, 16, 1)}[layer]
    assert lowrank.bypass_pays(LayerSpec.from_module(mod), torch.zeros(shape)) == taken


@pytest.mark.parametrize("raw", ["-1", "x", "nan", ""])
def test_rows_factor_rejects_a_bad_value(monkeypatch, raw):
    monkeypatch.setenv("LYCO_BYPASS_ROWS", raw)
    with pytest.raises(ValueError, match="LYCO_BYPASS_ROWS"):
        lowrank.bypass_pays(LayerSpec.from_module(nn.Linear(4, 4)), torch.zeros(2, 4))


@pytest.mark.parametrize("algo, nhwc, taken", [("lora", True, True), ("lokr", True, False), ("lora", False, False)])
def test_shape_rule_channels_last(monkeypatch, triton_interpreter, algo, nhwc, taken):
    """A k×k conv below the rule's positions ≥ out·∏k/8 (16 < 18 here) is taken where the op runs channels-last
    with its epilogue (``_conv_nhwc``, ``_conv_epilogue``; forced in: the CPU has neither) and the input has
    positions ≥ in·∏k/24 — for ungrouped adapters: LoKr's grouped down (``bypass_grouped``) keeps the delta path."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setattr(lowrank, "_conv_epilogue", lambda x, spec: nhwc)
    monkeypatch.setattr(lowrank, "_conv_nhwc", lambda spec, x: nhwc)
    torch.manual_seed(0)
    cfg = dict(algo=algo, rank=2) if algo == "lora" else dict(algo="lokr", rank=2, factor=2)
    model, net = _setup(nn.Conv2d(8, 16, 3, padding=1), cfg)
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    assert (_node(model(x)) == "_BypassOpBackward") == taken


@pytest.mark.parametrize("cfg, taken", [
    (dict(algo="lora", rank=2), True),   # the control: the same layer and input take the op
    (dict(algo="loha", rank=2), True),
    (dict(algo="lora", rank=2, dropout=0.1), False),
    (dict(algo="lora", rank=2, rank_dropout=0.2), False),
    (dict(algo="dylora", rank=4, block_size=2), False),
    (dict(algo="lora", rank=2, use_tucker=True), False),
    (dict(algo="lora", rank=2, dora=True), False),
    (dict(algo="lokr", rank=2, factor=2), True),    # low-rank W2: the op with B on each channel group
    (dict(algo="lokr", rank=2, factor=2, use_tucker=True), False),
    # full W2 with many positions per weight (162 > 0.75·16·9, LoKr.prefers_op_over_rebuild): its rebuilt op
    (dict(algo="lokr", rank=2, factor=2, full_matrix=True), False),
])
def test_not_taken_where_the_delta_path_must_run(monkeypatch, cfg, taken):
    """Dropout family and DyLoRA in training, and adapters that are not a two-factor product here, keep the
    delta path."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    torch.manual_seed(0)
    model, net = _setup(nn.Conv2d(16, 16, 3, padding=1), cfg)
    model.train()
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64, requires_grad=True)  # 162 positions ≥ 16·9
    assert (_node(model(x)) == "_BypassOpBackward") == taken


def test_two_adapters_keep_the_delta_path(monkeypatch):
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).double()
    x = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)  # 8 rows ≥ 8 outputs: the shapes pay
    lyco.create(model, preset="full", algo="lora", rank=2)
    assert _node(model(x)) == "_BypassOpBackward"  # the control: one adapter takes the op
    lyco.create(model, preset="full", algo="lora", rank=2, seed=1)
    assert len(model[0]._lyco_host.adapters) == 2
    assert _node(model(x)) != "_BypassOpBackward"


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_whole_tiny_unet_equals_the_delta_path(monkeypatch, algo):
    """The layer hosts of a whole (tiny, SD1-structured) UNet with LoCon/LoHa on every linear and conv layer, in
    float64: inside ``graph_step`` (the op, forced on every supported layer) the output and every adapter gradient
    equal the delta path's outside it. Guards the host integration on a real module tree (3-D linear inputs, 1×1
    proj convs fed by permuted views, resnet and down/upsample convs)."""
    pytest.importorskip("diffusers")
    from lyco.models.tiny import tiny_components
    monkeypatch.delenv("LYCO_BYPASS_OP", raising=False)
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    unet = tiny_components("sd1", dtype=torch.float64)["unet"]
    extra = dict(factor=2) if algo == "lokr" else {}   # LoKr: low-rank W2 on every layer, convs with a grouped down
    net = lyco.create({"unet": unet}, algo=algo, rank=4, alpha=2.0, preset="full", conv_rank=2, seed=0, **extra)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_((0.1 * torch.randn(p.shape, generator=g)).to(p.dtype))
    params = list(net.trainable_parameters())
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 7, cfg.cross_attention_dim, generator=g, dtype=torch.float64)
    calls, seen = [], []
    real = lowrank._BypassOp.apply
    monkeypatch.setattr(lowrank._BypassOp, "apply", lambda *a: calls.append(1) or seen.append(a) or real(*a))

    def step():
        y = unet(x, 10, encoder_hidden_states=ctx).sample
        return y, torch.autograd.grad((y * y).sum(), params)
    y0, g0 = step()
    assert not calls
    with graph_policy.graph_step():
        y1, g1 = step()
    # LoRA: most layers take the op (the others: inputs not contiguous NCHW, e.g. proj_out fed by a permuted view);
    # LoHa and LoKr: where their low-rank forms pay at these tiny widths
    assert len(calls) >= (len(net.layers) // 2 if algo == "lora" else 1), (len(calls), len(net.layers))
    if algo == "lokr":  # the grouped conv down ran (cfg's groups > 1)
        assert any(isinstance(a[1], tuple) and a[1][3] > 1 and a[1][0].kind == "conv2d" for a in seen), seen[:3]
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-10)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_eye_form_checks_its_shapes():
    """The op's ``eye`` form names what it expected: a conv, W1 ``(out/eye, groups)``, a down of ``eye`` rows."""
    spec = LayerSpec.from_module(nn.Conv2d(8, 16, 3, padding=1))
    x = torch.randn(1, 8, 4, 4, requires_grad=True)
    w, w2 = torch.randn(16, 8, 3, 3), torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match=r"eye=4.*W1 \(4, 2\).*got conv2d, W1 \(3, 2\)"):
        lowrank.bypass_op(x, spec, w, None, w2, torch.randn(3, 2), 1.0, 2, eye=4)
    y = lowrank.bypass_op(x, spec, w, None, w2.requires_grad_(), torch.randn(4, 2), 1.0, 2, eye=4)
    assert y.shape == (1, 16, 4, 4)


def _dense_lokr_full(t):
    """kron(W1, W2) of a LoKr with both factors full (γ = 1), float64, from the definition (W2 flattened per row)."""
    w2 = t["lokr_w2"]
    return torch.kron(t["lokr_w1"], w2.reshape(w2.shape[0], -1))


@pytest.mark.parametrize("m", [1.0, 0.7])
@pytest.mark.parametrize("layer", ["3x3-p1", "3x3-p0", "3x3-s2", "3x3-d2"])
@pytest.mark.parametrize("channels", [32, 64])
def test_lokr_full_w2_conv_takes_the_op_over_the_rebuild(monkeypatch, m, layer, channels):
    """LoKr with a full W2 on a 3×3 conv (``full_matrix``): ``mode = "auto"`` rebuilds it, but in a step that takes
    the op and where the positions are few per weight (``LoKr.prefers_op_over_rebuild``) the op runs it as a LoRA —
    down W2 on each of the in_m channel groups, up ``kron(W1, I)``; outputs and gradients (x, W1, W2) equal float64
    math on ``kron(W1, W2)``. With the rule off the same layer takes the rebuilt op."""
    from lyco.algorithms.lokr import LoKr
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setattr(LoKr, "EYE_POSITIONS", 1e9)
    torch.manual_seed(0)
    mod = nn.Conv2d(channels, 48, **CONVS[layer])
    model, net = _setup(mod, dict(algo="lokr", rank=2, factor=4, full_matrix=True))
    net.set_multiplier(m)
    a, t = _adapter_tensors(mod)
    assert set(t) == {"lokr_w1", "lokr_w2", "alpha"} and a.prefers_rebuild
    x = torch.randn(2, channels, 9, 7, dtype=torch.float64, requires_grad=True)
    gy = torch.randn_like(model(x).detach())
    y, grads, node = _run(model, x, gy)
    assert node == "_BypassOpBackward"
    leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in t.items()}
    xr = x.detach().clone().requires_grad_()
    w = mod.weight.detach() + m * _dense_lokr_full(leaves).reshape(mod.weight.shape)
    yr = F.conv2d(xr, w, mod.bias, mod.stride, mod.padding, mod.dilation)
    gr = torch.autograd.grad(yr, [xr] + [leaves[k] for k, v in t.items() if v.requires_grad], gy)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    assert len(grads) == len(gr) == 3
    for g, r in zip(grads, gr):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    monkeypatch.setattr(LoKr, "EYE_POSITIONS", 0.0)
    y0, grads0, node0 = _run(model, x, gy)
    assert node0 != "_BypassOpBackward"
    torch.testing.assert_close(y0, yr, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads0, gr):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("m", [1.0, 0.7])
@pytest.mark.parametrize("layer", ["linear-3d", "linear-2d", "1x1", "3x3-p1"])
def test_glora_takes_the_op_as_a_rank_2r_lora(monkeypatch, m, layer):
    """GLoRA (``mode = "auto"`` rebuilds it) in a step that takes the op: on a linear layer or 1×1 conv the op with
    ``U = [W·A1 | B1]``, ``D = [A2 ; B2]``; outputs and gradients (x, a1, a2, b1, b2) equal float64 math on
    ``W + m·γ·(W·a1·a2 + b1·b2)``. A 3×3 conv (b2 carries the kernel, a2 does not) keeps the rebuilt op; so does
    every layer with ``GLoRA.op_over_rebuild`` off."""
    from lyco.algorithms.glora import GLoRA
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    torch.manual_seed(0)
    if layer.startswith("linear"):
        mod = nn.Linear(12, 10)
        x = torch.randn(2, 5, 12) if layer == "linear-3d" else torch.randn(7, 12)
    else:
        mod = nn.Conv2d(12, 10, **CONVS[layer])
        x = torch.randn(2, 12, 5, 4)
    model, net = _setup(mod, dict(algo="glora", rank=3, alpha=2.0))
    net.set_multiplier(m)
    a, t = _adapter_tensors(mod)
    assert a.prefers_rebuild
    x = x.double().requires_grad_()
    gy = torch.randn_like(model(x).detach())
    y, grads, node = _run(model, x, gy)
    assert (node == "_BypassOpBackward") == (layer != "3x3-p1")
    lv = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in t.items()}
    xr = x.detach().clone().requires_grad_()
    w = mod.weight.detach()
    w2 = w.reshape(w.shape[0], -1)
    a1, a2, b1, b2 = (lv[k].reshape(lv[k].shape[0], -1) for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"))
    gamma = float(t["alpha"]) / a2.shape[0]
    if layer == "3x3-p1":  # W·A1 contracts W's input axis, per kernel tap
        wa = torch.einsum("oikl,ir,rj->ojkl", w, a1, a2)
    else:
        wa = (w2 @ a1 @ a2).reshape(w.shape)
    wm = w + m * gamma * (wa + (b1 @ b2).reshape(w.shape))
    yr = F.linear(xr, wm, mod.bias) if layer.startswith("linear") else F.conv2d(
        xr, wm, mod.bias, mod.stride, mod.padding, mod.dilation)
    gr = torch.autograd.grad(yr, [xr] + [lv[k] for k, v in t.items() if v.requires_grad], gy)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    assert len(grads) == len(gr) == 5
    for g, r in zip(grads, gr):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    monkeypatch.setattr(GLoRA, "op_over_rebuild", False)
    net.set_multiplier(m)  # a multiplier set drops the host's cached state: it reads the class switch again
    assert _run(model, x, gy)[2] != "_BypassOpBackward"


@pytest.mark.parametrize("cfg", ["lora", "loha", "lokr-full", "lokr"])
@pytest.mark.parametrize("flag", ["1", "0"])
def test_dgrad_on_a_channels_last_merged_weight(monkeypatch, cfg, flag):
    """``LYCO_DGRAD_WEIGHT_CL``: where a k×k conv's positions are at most in·∏k, its ∂x runs on the merged weight made
    channels-last (``lowrank._dgrad_cl``) — ∂x comes back channels-last, every value as float64 math on the merged
    weight; with the switch off ∂x stays NCHW. Positions above in·∏k keep NCHW either way, and so does LoKr's
    grouped low-rank op (measured slower with it)."""
    from lyco.algorithms.lokr import LoKr
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setenv("LYCO_DGRAD_WEIGHT_CL", flag)
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    monkeypatch.setattr(LoKr, "EYE_POSITIONS", 1e9)
    torch.manual_seed(0)
    mod = nn.Conv2d(16, 24, 3, padding=1)
    conf = (dict(algo="lokr", rank=2, factor=4, full_matrix=True) if cfg == "lokr-full"
            else dict(algo="lokr", rank=2, alpha=1.5, factor=4) if cfg == "lokr"
            else dict(CFGS[cfg], conv_rank=2))
    model, net = _setup(mod, conf)
    net.set_multiplier(0.7)
    _, t = _adapter_tensors(mod)
    if cfg == "lokr":
        assert "lokr_w2_b" in t
    for hw, cl in ((3, flag == "1" and cfg != "lokr"), (13, False)):  # 2·3·3 = 18 ≤ 16·9 positions; 338 above
        x = torch.randn(2, 16, hw, hw, dtype=torch.float64, requires_grad=True)
        gy = torch.randn_like(model(x).detach())
        y, grads, node = _run(model, x, gy)
        assert node == "_BypassOpBackward"
        assert grads[0].is_contiguous(memory_format=torch.channels_last) == cl
        assert grads[0].is_contiguous() == (not cl)
        lv = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in t.items()}
        xr = x.detach().clone().requires_grad_()
        dw = (_dense_lokr_full(lv) if cfg == "lokr-full" else _dense_delta(cfg, lv)).reshape(mod.weight.shape)
        yr = F.conv2d(xr, mod.weight.detach() + 0.7 * dw, mod.bias, padding=1)
        gr = torch.autograd.grad(yr, [xr] + [lv[k] for k, v in t.items() if v.requires_grad], gy)
        torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
        for g, r in zip(grads, gr):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_graph_step_runs_the_backward_on_the_calling_thread(monkeypatch):
    """``graph_step`` (``LYCO_CALLER_BACKWARD``): autograd's multithreading off inside the outermost block — a
    Function's backward sees it off and runs on the caller's thread — and back as it was after it (nested blocks,
    an error inside); ``0`` keeps torch's threads; a typo is an error that leaves no block open. On the CPU
    autograd runs the backward on the caller's thread either way: the thread is checked for form, the flag the
    backward sees is what can fail here (the GPU's device threads are run 175's check, check_cuda_graph.py)."""
    import threading

    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append((torch._C._is_multithreading_enabled(), threading.get_ident()))
            return g * 2

    def step():
        Probe.apply(torch.ones(3, requires_grad=True)).sum().backward()

    assert torch._C._is_multithreading_enabled()
    with graph_policy.graph_step():
        with graph_policy.graph_step():
            step()
        assert not torch._C._is_multithreading_enabled()
    assert torch._C._is_multithreading_enabled()
    assert seen == [(False, threading.get_ident())]
    with pytest.raises(RuntimeError, match="inside"), graph_policy.graph_step():
        raise RuntimeError("inside")
    assert torch._C._is_multithreading_enabled() and not graph_policy.in_graph_step()
    monkeypatch.setenv("LYCO_CALLER_BACKWARD", "0")
    with graph_policy.graph_step():
        step()
        assert graph_policy.in_graph_step()
    assert seen[-1][0] is True
    monkeypatch.setenv("LYCO_CALLER_BACKWARD", "no")
    with pytest.raises(ValueError, match="LYCO_CALLER_BACKWARD"), graph_policy.graph_step():
        pass
    assert not graph_policy.in_graph_step() and torch._C._is_multithreading_enabled()


@pytest.mark.parametrize("conv, taken", [
    (dict(kernel_size=3, padding=1), True),
    (dict(kernel_size=3, padding=0), True),
    (dict(kernel_size=3, padding=1, stride=2), False),  # _im2col_ok: stride 1 only
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_delta_path_conv_down_weight_gradient(monkeypatch, conv, taken, dtype, algo):
    """``LYCO_CONV_DOWN_IM2COL`` (:func:`lowrank.conv_down`): LoCon's and LoHa's (its Khatri–Rao down, run 248) delta
    path on a 3×3 conv takes ∂D from ``_conv_wgrad_nchw`` — every gradient (x and the factors: LoHa's four through
    its Khatri–Rao products) against the same step with autograd's conv (the switch at 0): float64 to 1e-12, bf16
    within its rounding; not taken where the rule refuses (stride 2)."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "0")
    g = torch.Generator().manual_seed(7)
    cin = 24 if algo == "lora" else 48  # LoHa's down has r·r = 9 channels: 9·9 shifted planes ≤ 2·in (_im2col_ok)
    model = nn.Sequential(nn.Conv2d(cin, 10, **conv)).to(dtype)
    net = lyco.create(model, algo=algo, rank=3, alpha=2.0, conv_rank=3, conv_alpha=2.0, preset="full", seed=0)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.dtype))
    x = torch.randn(2, cin, 9, 7, generator=g).to(dtype).requires_grad_()
    params = [x] + list(net.trainable_parameters())
    out, calls = {}, []
    real = lowrank._ConvDown.apply
    monkeypatch.setattr(lowrank._ConvDown, "apply", lambda *a: calls.append(1) or real(*a))
    for mode in ("0", "1"):
        monkeypatch.setenv("LYCO_CONV_DOWN_IM2COL", mode)
        calls.clear()
        y = model(x)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        out[mode] = (y, torch.autograd.grad(y, params, gy))
        assert bool(calls) == (taken and mode == "1")
    assert torch.equal(out["0"][0], out["1"][0])
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    for a, b in zip(out["0"][1], out["1"][1]):
        assert ((a.double() - b.double()).abs().max() / a.double().abs().max()).item() <= tol


def test_delta_path_conv_down_under_autocast(monkeypatch):
    """The trainer's mixed precision (fp32 model and adapter, bf16 autocast) on :func:`lowrank.conv_down`: the same
    gradients, in the parameters' dtypes, as with autograd's conv (run 214: the backward mixed fp32 and bf16)."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "0")
    g = torch.Generator().manual_seed(8)
    model = nn.Sequential(nn.Conv2d(24, 10, kernel_size=3, padding=1))
    net = lyco.create(model, algo="lora", rank=3, alpha=2.0, conv_rank=3, conv_alpha=2.0, preset="full", seed=0)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randn(2, 24, 9, 7, generator=g, requires_grad=True)
    params = [x] + list(net.trainable_parameters())
    out = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("LYCO_CONV_DOWN_IM2COL", mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        if mode == "1":  # its backward mixes no dtypes: what it keeps is autocast's bf16 (cuDNN refuses a mix)
            node = _find_node(y.grad_fn, "_ConvDownBackward")
            assert node is not None and all(t.dtype == torch.bfloat16 for t in node.saved_tensors)
        out[mode] = torch.autograd.grad(y.float().sum(), params)
    for a, b in zip(out["0"], out["1"]):
        assert a.dtype == b.dtype == torch.float32
        assert ((a - b).abs().max() / a.abs().max()).item() <= 2e-2


def _find_node(fn, name):
    seen, todo = set(), [fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if type(f).__name__ == name:
            return f
        todo.extend(g for g, _ in f.next_functions)
    return None

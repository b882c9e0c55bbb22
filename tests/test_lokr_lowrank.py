"""LoKr with a low-rank W2 trained as a LoRA: ``kron(W1, A·B) = kron(W1, A)·kron(I, B)`` (lokr.py).

The fast path (``LoKr._kron_lora``) is checked against an independent float64 computation that
materialises ``ΔW = γ·kron(W1, A·B)`` with ``torch.kron`` and runs the layer on ``W + m·ΔW`` —
outputs and the gradients of the input and of every factor — on linear layers (2-D and 3-D input),
strided/padded 3×3 convs, a 1-D conv, with W1 full or decomposed, W2 plain or Tucker."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lyco
from lyco.algorithms import lokr as lokr_mod, lowrank


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv1d = nn.Conv1d(32, 32, 3, padding=2, dilation=2, bias=False)
        self.lin = nn.Linear(32, 48)
        self.lin2d = nn.Linear(48, 32, bias=False)

    def forward(self, img, tok):
        h = torch.tanh(self.conv(img))                        # (N, 32, 3, 3)
        h = self.conv1d(h.flatten(2))                          # (N, 32, 9)
        t = tok + h.mean(-1)[:, None, :]                       # (N, T, 32)
        t = torch.tanh(self.lin(t))                            # 3-D input
        return self.lin2d(t.mean(1))                           # 2-D input


CASES = {
    "plain": dict(algo="lokr", rank=2, alpha=3.0, factor=4),
    "decompose-both": dict(algo="lokr", rank=1, alpha=0.5, factor=8, decompose_both=True),
    "tucker": dict(algo="lokr", rank=2, alpha=1.0, factor=4, use_tucker=True),
}


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, 16, 6, 6, generator=g, dtype=torch.float64),
            torch.randn(2, 5, 32, generator=g, dtype=torch.float64))


def _kron_dw(t, shape):
    """γ·kron(W1, W2) from the file tensors, written from the format's definition (fp64)."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_t2" in t:  # W2[k, n, …] = Σ_ij t2[i, j, …]·a[i, k]·b[j, n]
        w2 = torch.einsum("ij...,ik,jn->kn...", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1)).reshape(t["lokr_w2_a"].shape[0], -1)
    w2 = w2.reshape(w2.shape[0], -1)
    r = t["lokr_w2_b"].shape[0]
    gamma = float(t["alpha"]) / r
    return gamma * torch.kron(w1, w2).reshape(shape)


def _reference(model, net, m, img, tok):
    """The model run on W + m·ΔW for every adapted layer, by plain torch functions."""
    lay = {name.split("__")[-1]: layer for name, layer in net.layers.items()}

    def w(mod, name):
        t = {k: v for k, v in lay[name].tensors().items()}
        return mod.weight + m * _kron_dw(t, mod.weight.shape)

    h = torch.tanh(F.conv2d(img, w(model.conv, "conv"), model.conv.bias, 2, 1))
    h = F.conv1d(h.flatten(2), w(model.conv1d, "conv1d"), None, 1, 2, 2)
    t = tok + h.mean(-1)[:, None, :]
    t = torch.tanh(F.linear(t, w(model.lin, "lin"), model.lin.bias))
    return F.linear(t.mean(1), w(model.lin2d, "lin2d"))


def _grads(out, leaves):
    return torch.autograd.grad((out.square().sum() + out.sum()), leaves)


def _check_reference(model, net, m, params, out, got):
    """``out`` and ``got`` (the gradients of x, the tokens and ``params``, :func:`_grads`' loss) against
    :func:`_reference` on fresh inputs, float64."""
    img2, tok2 = (v.clone().requires_grad_(True) for v in _inputs())
    ref = _reference(model, net, m, img2, tok2)
    want = _grads(ref, [img2, tok2] + params)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-11)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("multiplier", [1.0, 0.7])
@pytest.mark.parametrize("mode", ["auto", "bypass"])
def test_kron_lora_equals_dense_kron(case, multiplier, mode, monkeypatch):
    torch.manual_seed(0)
    model = Net().double()
    model.requires_grad_(False)
    net = lyco.create(model, preset="full", seed=0, mode=mode, **CASES[case])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # W2's "b" starts at zero: move every factor off its init
        for p in net.trainable_parameters():
            p.add_((0.3 * torch.randn(p.shape, generator=g)).to(p.dtype))
    net.set_multiplier(multiplier)
    layers = list(net.layers.values())
    assert all("lokr_w2_b" in layer.tensors() for layer in layers)  # every layer's W2 is low-rank
    if case == "tucker":
        assert "lokr_t2" in net.layers["model__conv"].tensors()

    calls = []
    orig = lokr_mod.LoKr._kron_lora

    def spy(self, *a, **k):
        y = orig(self, *a, **k)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(lokr_mod.LoKr, "_kron_lora", spy)
    assert not any(layer.prefers_rebuild for layer in layers)  # auto takes the delta path
    img, tok = (v.clone().requires_grad_(True) for v in _inputs())
    params = list(net.trainable_parameters())
    out = model(img, tok)
    got = _grads(out, [img, tok] + params)
    assert calls == [True] * 4  # every layer ran the LoRA form

    _check_reference(model, net, multiplier, params, out, got)


def _harmonic_width(out_dim, in_dim, ksize):
    """``out·in·∏k / (out + in·∏k)``, written here from the rule's definition."""
    flat = in_dim * ksize
    return out_dim * flat / (out_dim + flat)


@pytest.mark.parametrize("shape,rebuild", [
    # SD1.5 layers with the benchmark's rank 16 / factor 8 (h = 8·16 channels), as runs 83–84 measured them
    ((320, 320, ()), True), ((320, 2560, ()), True), ((1280, 320, ()), True), ((768, 320, ()), True),
    ((640, 640, ()), True), ((768, 640, ()), False), ((640, 5120, ()), False), ((1280, 1280, ()), False),
    ((320, 320, (3, 3)), True), ((640, 320, (3, 3)), True), ((640, 640, (3, 3)), False),
    ((320, 640, (3, 3)), False), ((1280, 1280, (3, 3)), False), ((320, 320, (1, 1)), True),
])
def test_weight_grad_rule_on_sd15_shapes(shape, rebuild):
    """Where the bypass op runs, auto's choice between it and the rebuilt op for a low-rank W2, per layer from
    the shapes (LoKr.prefers_rebuild_in_op): the rebuilt op where the harmonic width is at most 340 at a
    128-channel h — the layers where GPU runs 83–84 measured it faster. Outside the op's steps the LoRA form
    (prefers_rebuild stays False)."""
    in_dim, out_dim, k = shape
    mod = nn.Linear(in_dim, out_dim) if not k else nn.Conv2d(in_dim, out_dim, k, padding=k[0] // 2)
    net = lyco.create(nn.Sequential(mod).requires_grad_(False), preset="full", algo="lokr", rank=16, factor=8)
    layer = next(iter(net.layers.values()))
    t = layer.tensors()
    assert t["lokr_w1"].shape[1] * t["lokr_w2_b"].shape[0] == 128
    ksize = k[0] * k[1] if k else 1
    assert (_harmonic_width(out_dim, in_dim, ksize) <= 340.0) == rebuild
    assert layer.algorithm.prefers_rebuild_in_op(t, layer.spec) == rebuild
    assert not layer.prefers_rebuild


@pytest.mark.parametrize("kind,batch,hw", [("lin", 1, 64), ("lin", 4, 64), ("lin", 8, 64), ("conv", 1, 64),
                                            ("conv", 8, 64), ("conv", 8, 32), ("conv", 4, 64)])
def test_rebuild_needs_rows(kind, batch, hw):
    """The width rule's narrow layers rebuild only on inputs of at least ``REBUILD_MIN_ROWS`` (16384) rows — the
    batch times the positions, counted here from the input's shape (SD1.5 b1's 64×64 level: 4096 rows, the LoRA
    form; b8: 32768, rebuilt; b8 at 32×32: 8192, the LoRA form) — and the same layer without an input as before."""
    mod = nn.Linear(320, 320) if kind == "lin" else nn.Conv2d(320, 320, 3, padding=1)
    net = lyco.create(nn.Sequential(mod).requires_grad_(False), preset="full", algo="lokr", rank=16, factor=8)
    layer = next(iter(net.layers.values()))
    t = layer.tensors()
    x = torch.zeros(batch, hw * hw, 320) if kind == "lin" else torch.zeros(batch, 320, hw, hw)
    rows = batch * hw * hw
    assert layer.algorithm.prefers_rebuild_in_op(t, layer.spec)  # a narrow layer (harmonic width 160 or 288)
    assert layer.algorithm.prefers_rebuild_in_op(t, layer.spec, x) == (rows >= 16384)


@pytest.mark.parametrize("policy,mode", [("1", "auto"), ("1", "bypass"), ("graph", "auto")])
def test_narrow_layers_rebuilt_in_the_op_steps(policy, mode, monkeypatch):
    """With the bypass op on (``LYCO_BYPASS_OP=1``) and ``mode = "auto"`` the layers the rule names narrow (named
    from the shapes here) run the rebuilt op, the others the op; ``mode = "bypass"`` or an eager step under the
    default policy never rebuild. Outputs and every gradient equal the dense float64 reference in each case."""
    monkeypatch.setenv("LYCO_BYPASS_OP", policy)
    # the op's shape rule (positions ≥ out, …) would leave these tiny inputs on the delta path: every layer here
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    # and the rows rule (LoKr._rows_pay) would leave them all on the LoRA form: tested on its own below
    monkeypatch.setattr(lokr_mod.LoKr, "REBUILD_MIN_ROWS", 0.0)
    torch.manual_seed(0)
    model = Net().double().requires_grad_(False)
    net = lyco.create(model, preset="full", seed=0, mode=mode, **CASES["plain"])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_((0.3 * torch.randn(p.shape, generator=g)).to(p.dtype))
    mods = {"conv": model.conv, "conv1d": model.conv1d, "lin": model.lin, "lin2d": model.lin2d}
    narrow = set()
    for name, layer in net.layers.items():
        mod = mods[name.split("__")[-1]]
        t = layer.tensors()
        width = t["lokr_w1"].shape[1] * t["lokr_w2_b"].shape[0]
        if _harmonic_width(mod.weight.shape[0], mod.weight.shape[1], mod.weight[0, 0].numel()) <= 340 / 128 * width:
            narrow.add(id(t["lokr_w1"]))
    assert 0 < len(narrow) < len(net.layers)  # both paths exercised

    rebuilt = []
    orig = lokr_mod.LoKr.rebuild_op
    monkeypatch.setattr(lokr_mod.LoKr, "rebuild_op",
                        lambda self, x, t, *a: rebuilt.append(id(t["lokr_w1"])) or orig(self, x, t, *a))
    img, tok = (v.clone().requires_grad_(True) for v in _inputs())
    params = list(net.trainable_parameters())
    out = model(img, tok)
    got = _grads(out, [img, tok] + params)
    assert set(rebuilt) == (narrow if (policy, mode) == ("1", "auto") else set())
    _check_reference(model, net, 1.0, params, out, got)


def test_kron_lora_keeps_rank_sized_tensors_only():
    """What the LoRA form keeps for backward on a 3×3 conv: x (the layer's input), h ((N, in_m·r, …):
    rank-sized) and the small factors — no output-sized or weight-sized tensor."""
    conv = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1)).requires_grad_(False)
    lyco.create(conv, preset="full", algo="lokr", rank=2, factor=4, seed=0)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    frozen = {p.data_ptr() for p in conv.parameters() if not p.requires_grad}
    sizes = []

    def pack(t):
        if t.data_ptr() != x.data_ptr() and t.data_ptr() not in frozen:  # x and the base weight: not extra
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = conv(x)
    # h: in_m·r = 4·2 channels — a quarter of the output's 32; the rest are the small factors
    assert sizes and max(sizes) <= y.numel() // 4, (sizes, y.numel())


def test_kron_lora_skipped_when_it_does_not_pay(monkeypatch):
    """Where the LoRA form costs more multiply-adds per position than the layer (out·in·∏k), LoKr keeps
    the rebuilt op under mode = "auto" — and still computes the dense reference."""
    lin = nn.Sequential(nn.Linear(32, 32))
    net = lyco.create(lin, preset="full", algo="lokr", rank=3, factor=2, seed=0)  # (2, 16): W2 low-rank
    layer = next(iter(net.layers.values()))
    assert "lokr_w2_b" in layer.tensors()
    assert not layer.prefers_rebuild  # r·(in + out·in_m) = 3·(32 + 64) = 288 < 32·32: pays

    # out 128 = 4·32, in 16 = 4·4: rank 8 < 32/2 keeps W2 low-rank, but 8·(16 + 128·4) = 4224 > 128·16
    model = nn.Sequential(nn.Linear(16, 128)).double().requires_grad_(False)
    net = lyco.create(model, preset="full", algo="lokr", rank=8, alpha=4.0, factor=4, seed=0)
    layer = next(iter(net.layers.values()))
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert "lokr_w2_b" in layer.tensors()
    assert layer.prefers_rebuild
    monkeypatch.setattr(lokr_mod.LoKr, "_kron_lora", lambda *a, **k: pytest.fail("LoRA form taken"))
    x = torch.randn(3, 16, dtype=torch.float64)
    t = layer.tensors()
    want = x @ (model[0].weight + _kron_dw(t, model[0].weight.shape)).T + model[0].bias
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("raw,want", [(None, 2.5), ("0", 0.0), ("3.25", 3.25), ("abc", None), ("-1", None),
                                      ("nan", None)])
def test_wgrad_threshold_from_the_environment(monkeypatch, raw, want):
    """``LYCO_LOKR_WGRAD_PER_H``: unset → the default, a number ≥ 0 → it, anything else an error naming it."""
    from lyco.errors import ConfigError
    if raw is None:
        monkeypatch.delenv("LYCO_LOKR_WGRAD_PER_H", raising=False)
    else:
        monkeypatch.setenv("LYCO_LOKR_WGRAD_PER_H", raw)
    if want is None:
        with pytest.raises(ConfigError, match="LYCO_LOKR_WGRAD_PER_H"):
            lokr_mod._env_float("LYCO_LOKR_WGRAD_PER_H", 2.5)
    else:
        assert lokr_mod._env_float("LYCO_LOKR_WGRAD_PER_H", 2.5) == want


@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("rows", ["1e9", "0"])
@pytest.mark.parametrize("case", ["plain", "decompose-both"])
def test_grouped_split_input_gradient(rows, case, sink, monkeypatch):
    """The bypass op's ∂x on a LoKr linear layer (its down ``kron(I, B)``: groups > 1) without the merged weight
    (``LYCO_MERGED_ROWS=1e9``: ``∂y·W + s·∂h·kron(I, B)``, the groups folded into the rows) or through it (``0``):
    the output and every gradient against the dense float64 reference — returned, or added by the op into kept
    gradients (the trainer's grad sink, ``casts.step_casts``) — the linear layers' ∂x weights built only where the
    rule asks for them."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setenv("LYCO_MERGED_ROWS", rows)
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    torch.manual_seed(0)
    model = Net().double().requires_grad_(False)
    net = lyco.create(model, preset="full", seed=0, mode="bypass", **CASES[case])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_((0.3 * torch.randn(p.shape, generator=g)).to(p.dtype))
    builds = []
    real = lowrank._w_in
    monkeypatch.setattr(lowrank, "_w_in", lambda weight, u2, d2, s, cd, groups, *a: builds.append(
        (weight.dim(), groups)) or real(weight, u2, d2, s, cd, groups, *a))
    img, tok = (v.clone().requires_grad_(True) for v in _inputs())
    params = list(net.trainable_parameters())
    if sink:
        from lyco.algorithms import casts
        for p in params:
            p.grad = torch.full_like(p, 0.25)
        with casts.step_casts(grad_sink=True):
            out = model(img, tok)
            (out.square().sum() + out.sum()).backward()
        got = [img.grad, tok.grad] + [p.grad - 0.25 for p in params]
    else:
        out = model(img, tok)
        got = _grads(out, [img, tok] + params)
    linear = [b for b in builds if b[0] == 2]
    assert all(gr > 1 for _, gr in linear)
    assert len(linear) == (0 if rows == "1e9" else 2)
    _check_reference(model, net, 1.0, params, out, got)


class _Wide(nn.Module):
    """A wide linear layer (16 → 96: the bypass op's concatenations, ``[x | h]`` forward and ``[∂x | ∂h]`` backward,
    pay on it at these rows — ∂B then from a strided ∂h and x, by a batched GEMM and its sum) and a narrow one."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 96), nn.Linear(96, 16)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.parametrize("sink", [False, True])
def test_grouped_down_gradient_into_grad(sink, monkeypatch):
    """LoKr's grouped downs under the trainer's grad sink: ∂B added into ``.grad`` by its GEMM (β = 1) on the layer
    whose ∂h and x are contiguous, and after the groups' batched GEMM and sum on the wide layer whose forward
    concatenated ``[x | h]`` — every gradient against the dense float64 model's (returned gradients alike)."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    torch.manual_seed(0)
    model = _Wide().double().requires_grad_(False)
    net = lyco.create(model, preset="full", algo="lokr", rank=2, alpha=3.0, factor=4, seed=0, mode="bypass")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_((0.3 * torch.randn(p.shape, generator=g)).to(p.dtype))
    paths = []
    real_mm, real_sum = lowrank._mm, lowrank._sum0
    monkeypatch.setattr(lowrank, "_mm", lambda a, b, s, dt=None, into=None: paths.append(
        "mm-into" if into is not None else "mm") or real_mm(a, b, s, dt, into))
    monkeypatch.setattr(lowrank, "_sum0", lambda t, dt: paths.append("sum") or real_sum(t, dt))
    params = list(net.trainable_parameters())
    x = torch.randn(2, 40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    loss = lambda y: y.square().sum() + y.sum()  # noqa: E731
    if sink:
        from lyco.algorithms import casts
        for p in params:
            p.grad = torch.full_like(p, 0.25)
        with casts.step_casts(grad_sink=True):
            loss(model(x)).backward()
        got = [x.grad] + [p.grad - 0.25 for p in params]
    else:
        got = list(torch.autograd.grad(loss(model(x)), [x] + params))
    assert "sum" in paths and ("mm-into" in paths) == sink
    lay = {name.removeprefix("model__"): layer for name, layer in net.layers.items()}
    leaves = [p.detach().clone().requires_grad_() for p in params]
    ids = {id(p): i for i, p in enumerate(params)}

    def merged(mod, key):
        t = {k: (leaves[ids[id(v)]] if id(v) in ids else v) for k, v in lay[key].tensors().items()}
        return mod.weight + _kron_dw(t, mod.weight.shape)

    xr = x.detach().clone().requires_grad_()
    ref = F.linear(torch.tanh(F.linear(xr, merged(model.up, "up"), model.up.bias)), merged(model.down, "down"),
                   model.down.bias)
    want = torch.autograd.grad(loss(ref), [xr] + leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)

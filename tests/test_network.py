"""Attaching, detaching, merging, stacking and training adapters on a torch model."""

import copy

import pytest
import torch
import torch.nn as nn

import lyco
from lyco.errors import ConfigError, ShapeMismatch, UnknownKeys


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv1x1 = nn.Conv2d(8, 8, 1)
        self.block = nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.SiLU())
        self.ln = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        h = self.norm(self.conv_in(x))
        h = self.conv1x1(torch.relu(h))  # (B, 8, H, W)
        b, c, hh, ww = h.shape
        h = self.block(h.reshape(b, c, hh * ww)).reshape(b, c, hh, ww)
        t = self.ln(h.mean(dim=(2, 3)))
        return self.fc2(torch.relu(self.fc1(t)))


def toy(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return Toy().to(dtype)


# every algorithm with options that exercise it; "norm" layers only get Norm/Full
CONFIGS = {
    "lora": dict(algo="lora", rank=3, alpha=2.0),
    "locon-tucker": dict(algo="lora", rank=3, alpha=2.0, use_tucker=True),
    "lora-dora": dict(algo="lora", rank=3, alpha=2.0, dora=True),
    "lora-dora-in": dict(algo="lora", rank=3, alpha=2.0, dora=True, dora_axis="in"),
    "loha": dict(algo="loha", rank=2, alpha=1.0),
    "loha-tucker": dict(algo="loha", rank=2, alpha=1.0, use_tucker=True),
    "lokr": dict(algo="lokr", rank=2, alpha=1.0, factor=2),
    "lokr-full": dict(algo="lokr", rank=2, factor=2, full_matrix=True),
    "lokr-dora": dict(algo="lokr", rank=2, alpha=1.0, factor=2, dora=True),
    "loha-dora": dict(algo="loha", rank=2, alpha=1.0, dora=True),
    "ia3": dict(algo="ia3"),
    "glora": dict(algo="glora", rank=2, alpha=1.0),
    "full": dict(algo="full"),
    "diag-oft": dict(algo="diag-oft", rank=4, constraint=0.0),
    "boft": dict(algo="boft", rank=2),
}


def _randomise(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.layers.values():
            for name, p in layer.params.items():
                r = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                if name == "dora_scale":
                    r = r.abs() + 0.5
                elif name.startswith("oft_blocks"):
                    r = r * 0.1
                else:
                    r = r * 0.3
                p.copy_(r)


def _make(model, cfg, preset=None, **kw):
    cfg = dict(cfg)
    if preset is None:
        preset = {"model": {"target_modules": ["Linear", "Conv1d", "Conv2d"]}, "include_conv": True}
    return lyco.create(model, preset=preset, **cfg, **kw)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_bits(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bypass_rebuild_merge_agree(name):
    model = toy()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    y0 = model(x)
    before = _snapshot(model)
    net = _make(model, CONFIGS[name], multiplier=0.7)
    _randomise(net)
    y_bypass = model(x)
    assert not torch.allclose(y_bypass, y0), "the adapter must change the output"
    for layer in net.layers.values():
        layer.mode = "rebuild"
    y_rebuild = model(x)
    for layer in net.layers.values():
        layer.mode = "auto"
    net.merge()
    y_merged = model(x)
    net.unmerge()
    torch.testing.assert_close(y_bypass, y_rebuild, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y_bypass, y_merged, rtol=1e-9, atol=1e-9)
    # permanent merge through the Adapter (fp32 math, one cast) matches too
    adapter = net.to_adapter()
    net.detach()
    assert _same_bits(before, _snapshot(model))
    m2 = copy.deepcopy(model)
    adapter.merge_into(m2, multiplier=0.7)
    torch.testing.assert_close(m2(x), y_bypass, rtol=1e-6, atol=1e-6)
    # and attaching the exported adapter reproduces the bypass output
    h = adapter.attach(model, multiplier=0.7)
    torch.testing.assert_close(model(x), y_bypass, rtol=1e-6, atol=1e-6)
    h.detach()
    assert _same_bits(before, _snapshot(model))


def test_detach_restores_model_exactly():
    model = toy()
    names = [n for n, _ in model.named_modules()]
    before = _snapshot(model)
    net = _make(model, CONFIGS["lora"])
    _randomise(net)
    assert [n for n, _ in model.named_modules()] == names  # module tree untouched
    assert list(model.state_dict()) == list(before)        # state-dict names untouched
    net.detach()
    assert _same_bits(before, _snapshot(model))
    assert all("forward" not in m.__dict__ and "_lyco_host" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("name", ["lora", "loha", "lokr", "lora-dora", "diag-oft", "ia3"])
def test_merge_unmerge_100_cycles_bf16_bit_identical(name):
    model = toy(dtype=torch.bfloat16)
    before = _snapshot(model)
    net = _make(model, CONFIGS[name], multiplier=0.9)
    _randomise(net)
    for i in range(100):
        net.merge()
        if i == 0:
            assert not _same_bits(before, _snapshot(model))
        net.set_multiplier(0.3 + 0.005 * i)  # re-merges at the new multiplier
        net.unmerge()
    assert _same_bits(before, _snapshot(model))
    net.detach()
    assert _same_bits(before, _snapshot(model))


def test_two_adapters_stack_with_own_multipliers():
    model = toy()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    y0 = model(x)
    a = _make(model, CONFIGS["lora"], multiplier=1.0)
    _randomise(a, 1)
    ya = model(x)
    b = _make(model, CONFIGS["loha"], multiplier=1.0)
    _randomise(b, 2)
    a.set_multiplier(0.0)
    yb = model(x)
    a.set_multiplier(1.0)
    yab = model(x)
    # first-order check on the linearised contributions: merged weights of both == sum of deltas
    a.merge()
    b.merge()
    y_merged = model(x)
    a.unmerge()  # a back to bypass, b still merged: same function
    torch.testing.assert_close(model(x), yab, rtol=1e-9, atol=1e-9)
    a.disable()
    torch.testing.assert_close(model(x), yb, rtol=1e-9, atol=1e-9)  # only b (merged)
    a.enable()
    b.unmerge()
    torch.testing.assert_close(y_merged, yab, rtol=1e-9, atol=1e-9)
    b.detach()
    torch.testing.assert_close(model(x), ya, rtol=1e-9, atol=1e-9)
    a.detach()
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["lora", "loha", "lokr", "lora-dora", "full", "diag-oft", "glora", "ia3"])
def test_training_touches_only_adapter_parameters(name):
    model = toy(dtype=torch.float32)
    before = _snapshot(model)
    net = _make(model, CONFIGS[name])
    _randomise(net)
    params = net.trainable_parameters()
    assert params
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = torch.randn(4, 3, 5, 5)
    target = torch.randn(4, 8)
    first = None
    for _ in range(3):
        loss = ((model(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        first = first or loss.item()
        opt.step()
    assert all(p.grad is None for p in model.parameters()) or all(
        not p.requires_grad or p.grad is None for p in model.parameters()), "base weights received gradients"
    got_grad = [p for p in params if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(got_grad) == len(params)
    assert _same_bits(before, _snapshot(model))


def test_failed_load_leaves_model_untouched():
    model = toy()
    net = _make(model, CONFIGS["lora"])
    _randomise(net)
    adapter = net.to_adapter()
    net.detach()
    before = _snapshot(model)
    bad = copy.deepcopy(adapter)
    name = next(n for n in bad.modules if n.endswith("fc1"))
    bad.modules[name].tensors["lora_down.weight"] = torch.randn(3, 9)  # wrong in-dim
    with pytest.raises(ShapeMismatch, match="fc1"):
        bad.attach(model)
    with pytest.raises(ShapeMismatch):
        bad.merge_into(model)
    assert _same_bits(before, _snapshot(model))
    assert all("forward" not in m.__dict__ for m in model.modules())
    extra = copy.deepcopy(adapter)
    extra.modules["model.nope"] = extra.modules[name]
    with pytest.raises(UnknownKeys, match="nope"):
        extra.attach(model)
    assert _same_bits(before, _snapshot(model))
    with pytest.warns(UserWarning, match="nope"):
        h = extra.attach(model, strict=False)
    assert h.unmatched == ["model.nope"]
    h.detach()
    assert _same_bits(before, _snapshot(model))


def test_presets_rules_and_overrides():
    model = toy()
    net = lyco.create(model, algo="lora", rank=2, preset={"model": {"target_names": ["fc*"], "exclude": ["fc2"]}})
    assert [l.name for l in net.layers.values()] == ["model.fc1"]
    net.detach()
    net = lyco.create(model, algo="lora", rank=2, conv_rank=5, preset="full",
                      overrides={"re:fc[12]": {"algo": "loha", "rank": 3}})
    kinds = {l.name: (l.algorithm.name, l.algorithm.rank(l.tensors())) for l in net.layers.values()}
    assert kinds["model.fc1"] == ("loha", 3) and kinds["model.fc2"] == ("loha", 3)
    assert kinds["model.conv_in"] == ("lora", 5)       # k×k conv gets the conv rank
    assert kinds["model.conv1x1"] == ("lora", 2)       # 1×1 conv counts as linear
    assert "model.norm" not in kinds                    # norms need include_norm
    net.detach()
    with pytest.raises(ConfigError, match="unknown key"):
        lyco.create(model, preset={"model": {"target_modulez": ["Linear"]}})
    with pytest.raises(ConfigError, match="unknown option"):
        lyco.create(model, algo="lora", preset="full", use_tuker=True)
    with pytest.raises(ConfigError, match="matched no layer"):
        lyco.create(model, preset={"model": {"target_names": ["nothing"]}})
    net = lyco.create(model, algo="lora", preset={"include_norm": True,
                                                  "model": {"target_modules": ["GroupNorm", "LayerNorm", "Linear"]}})
    assert {l.algorithm.name for l in net.layers.values() if l.spec.is_norm} == {"norm"}
    net.detach()


def test_anchored_regex_is_a_full_match():
    model = toy()
    # 're:fc' must not prefix-match fc1/fc2 (the re.match pitfall of LyCORIS's ia3 preset)
    with pytest.raises(ConfigError, match="matched no layer"):
        lyco.create(model, algo="lora", preset={"model": {"target_names": ["re:fc"]}})
    net = lyco.create(model, algo="lora", preset={"model": {"target_names": ["re:fc[0-9]"]}})
    assert sorted(l.name for l in net.layers.values()) == ["model.fc1", "model.fc2"]
    net.detach()

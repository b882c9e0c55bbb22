"""Wrong model: a family error up front, shape errors naming module and both shapes, unmatched
modules listed (strict by default), and all-or-nothing attach/merge (bit-identical weights after a
failure injected in the middle)."""

from __future__ import annotations

import warnings

import pytest
import torch

import lyco
from lyco.adapter import Adapter, ModuleAdapter
from lyco.errors import FamilyMismatch, ShapeMismatch, UnknownKeys
from lyco.layer import LayerHost

from _reliability_common import assert_bit_identical, bad_input, state_of


def _adapter(comps, tmp_path, name, algo="lora", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = lyco.create(comps, algo=algo, rank=2, preset="attn-mlp", seed=0, **kw)
        p = tmp_path / f"{name}.safetensors"
        net.save(p, overwrite=True)
        net.detach()
    a = lyco.load(p)
    g = torch.Generator().manual_seed(0)
    for m in a.modules.values():  # a fresh adapter is ΔW = 0 (up = 0): give it something to merge
        for k, v in m.tensors.items():
            if v.is_floating_point() and k not in ("alpha", "on_input"):
                m.tensors[k] = v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype)
    return a


@pytest.mark.parametrize("src,dst", [("sdxl", "sd1"), ("sd2", "sd1"), ("sd1", "sdxl"), ("sd1", "sd2"),
                                     ("sdxl", "sd2")])
def test_family_mismatch_up_front(request, tmp_path, src, dst):
    a = _adapter(request.getfixturevalue(src), tmp_path, src)
    assert a.family == src
    target = request.getfixturevalue(dst)
    before = state_of(target)
    with pytest.raises(FamilyMismatch) as ei:
        a.attach(target)
    assert repr(src) in str(ei.value) and repr(dst) in str(ei.value)
    with pytest.raises(FamilyMismatch):
        a.merge_into(target)
    assert_bit_identical(before, state_of(target))
    assert not any(getattr(m, "_lyco_host", None) for c in target.values() for m in c.modules())
    bad_input("adapter for another model family", f"{src} on {dst}: refused (FamilyMismatch)")


def test_shape_mismatch_names_module_and_both_shapes(sd1, tmp_path):
    a = _adapter(sd1, tmp_path, "sd1")
    name = next(n for n in sorted(a.modules) if n.startswith("unet.") and n.endswith("to_k"))
    m = a.modules[name]
    down = m.tensors["lora_down.weight"]
    bad = Adapter({name: ModuleAdapter("lora", {**m.tensors, "lora_down.weight": torch.zeros(down.shape[0],
                                                                                            down.shape[1] + 3)})},
                  dict(a.metadata), a.family, "bad.safetensors")
    before = state_of(sd1)
    for fn in (lambda: bad.attach(sd1), lambda: bad.merge_into(sd1)):
        with pytest.raises(ShapeMismatch) as ei:
            fn()
        msg = str(ei.value)
        w = dict(sd1["unet"].named_modules())[name.split(".", 1)[1]].weight
        assert name in msg and str(tuple(w.shape)) in msg, msg
        assert str((w.shape[0], down.shape[1] + 3)) in msg, msg  # what the file implies
    assert_bit_identical(before, state_of(sd1))
    bad_input("adapter tensor of the wrong shape", "refused (ShapeMismatch naming module and both shapes)")


def test_unmatched_modules_listed_and_strict_by_default(sd1, tmp_path):
    a = _adapter(sd1, tmp_path, "sd1")
    name = next(iter(sorted(a.modules)))
    extra = dict(a.modules)
    extra["unet.down_blocks.9.nothing_here"] = a.modules[name]
    b = Adapter(extra, dict(a.metadata), a.family, "x.safetensors")
    before = state_of(sd1)
    for fn in (lambda: b.attach(sd1), lambda: b.merge_into(sd1)):
        with pytest.raises(UnknownKeys) as ei:
            fn()
        assert "unet.down_blocks.9.nothing_here" in str(ei.value) and "strict=False" in str(ei.value)
    assert_bit_identical(before, state_of(sd1))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        net = b.attach(sd1, strict=False)
    assert net.unmatched == ["unet.down_blocks.9.nothing_here"]
    net.detach()
    assert_bit_identical(before, state_of(sd1))
    bad_input("adapter module with no layer in the model", "refused (UnknownKeys), listed; strict=False skips")


@pytest.mark.parametrize("algo,kw", [("lora", {}), ("lokr", {"factor": 2}), ("loha", {}), ("diag-oft", {}),
                                     ("lora", {"dora": True})])
def test_merge_is_all_or_nothing(sd1, tmp_path, monkeypatch, algo, kw):
    a = _adapter(sd1, tmp_path, f"m-{algo}", algo=algo, **kw)
    names = sorted(a.modules)
    victim = names[len(names) // 2]
    before = state_of(sd1)
    cls = type(a.modules[victim].algorithm)
    real = cls.merged
    calls = {"n": 0}

    def failing(self, t, spec, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == len(names) // 2 + 1:  # in the middle of the merge
            raise RuntimeError("injected failure")
        return real(self, t, spec, *args, **kwargs)

    monkeypatch.setattr(cls, "merged", failing)
    with pytest.raises(RuntimeError, match="injected"):
        a.merge_into(sd1)
    assert calls["n"] == len(names) // 2 + 1
    assert_bit_identical(before, state_of(sd1))
    monkeypatch.undo()
    a.merge_into(sd1)  # then a real merge changes the weights …
    after = state_of(sd1)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():  # … and is undone for the next test
        for c, mod in sd1.items():
            sd = mod.state_dict()
            for k, v in sd.items():
                v.copy_(before[f"{c}.{k}"])
    assert_bit_identical(before, state_of(sd1))
    bad_input("failure in the middle of merge_into", f"{algo}: rolled back, weights bit-identical")


def test_merge_rollback_when_one_layer_is_targeted_twice(sd1):
    """Two adapter names resolving to the same layer (dotted and flattened): the rollback restores the
    original even though that layer was merged twice before the failure."""
    lin = sd1["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    out_f, in_f = lin.weight.shape
    t = {"lora_down.weight": torch.ones(1, in_f) * 0.01, "lora_up.weight": torch.ones(out_f, 1),
         "alpha": torch.tensor(1.0)}
    mods = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": ModuleAdapter("lora", dict(t)),
            "unet.down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ModuleAdapter("lora", dict(t)),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": ModuleAdapter("lora", dict(t))}
    a = Adapter(mods, {}, None, "twice.safetensors")
    before = state_of(sd1)
    cls = type(next(iter(mods.values())).algorithm)
    real = cls.merged
    calls = {"n": 0}

    def third_fails(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return real(self, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "merged", third_fails)
        with pytest.raises(RuntimeError, match="injected"):
            a.merge_into(sd1)
    assert calls["n"] == 3  # the layer was merged twice before the failure
    assert_bit_identical(before, state_of(sd1))


def test_attach_is_all_or_nothing(sd1, tmp_path, monkeypatch):
    a = _adapter(sd1, tmp_path, "att")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    before = state_of(sd1)
    real = LayerHost.add
    calls = {"n": 0}
    n_layers = len(a.modules)

    def failing(self, layer):
        calls["n"] += 1
        if calls["n"] == n_layers // 2:
            raise RuntimeError("injected failure")
        return real(self, layer)

    monkeypatch.setattr(LayerHost, "add", failing)
    with pytest.raises(RuntimeError, match="injected"):
        a.attach(sd1)
    monkeypatch.undo()
    assert_bit_identical(before, state_of(sd1))
    # no layer keeps a hook: the model computes exactly what it computed before
    unet = sd1["unet"]
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = unet(x, 10, encoder_hidden_states=ctx).sample
        net = a.attach(sd1, multiplier=0.0)
        y1 = unet(x, 10, encoder_hidden_states=ctx).sample
        net.detach()
        y2 = unet(x, 10, encoder_hidden_states=ctx).sample
    assert torch.equal(y0, y2) and torch.allclose(y0, y1, atol=1e-6)
    bad_input("failure in the middle of attach", "rolled back, no hooks left, outputs identical")

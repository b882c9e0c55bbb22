"""Merged weights in low precision: every algorithm, fp16 and bf16 layers, one adapter and two.

The reference is independent of the layer host: the algorithm's own ``merged`` in float64 on the
float64 base weight, rounded once to the layer's dtype. A merge done in fp32 with a single rounding
at the end may differ from it only where the fp32 value sits within fp32 error of a rounding
boundary, so every merged weight must lie within half a unit in the last place (of its dtype) of the
float64 value, plus a few fp32 roundings of the terms (1/128 of that half unit for fp16)."""

from __future__ import annotations

import pytest
import torch

from test_network import CONFIGS, _make, _randomise, _same_bits, _snapshot, toy

NORM_PRESET = {"include_norm": True, "model": {"target_modules": ["Linear", "Conv1d", "Conv2d", "LayerNorm",
                                                                   "GroupNorm"]}}
CASES = dict(CONFIGS, **{"lora+norm": dict(algo="lora", rank=3, alpha=2.0, preset=NORM_PRESET)})


def _half_ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    mant = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    e = torch.floor(torch.log2(ref.abs().clamp_min(fi.smallest_normal)))
    return torch.exp2(e - mant) / 2


def _reference(layer, w: torch.Tensor, b: torch.Tensor | None, m: float):
    t = {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in layer.tensors().items()}
    return layer.algorithm.merged(t, layer.spec, w.double(), None if b is None else b.double(), m)


def _check_within_half_ulp(got: torch.Tensor, ref64: torch.Tensor, base: torch.Tensor, what: str):
    err = (got.double() - ref64).abs()
    fp32_slack = 64 * torch.finfo(torch.float32).eps * (ref64.abs() + base.double().abs())
    bound = _half_ulp(ref64, got.dtype) + fp32_slack + 1e-30
    bad = err > bound
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off by more than ½ ulp (max {float(err.max()):.3g})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_merged_weight_is_the_float64_value_rounded_once(name, dtype):
    model = toy(dtype=dtype)
    before = _snapshot(model)
    cfg = dict(CASES[name])
    preset = cfg.pop("preset", None)
    net = _make(model, cfg, preset, multiplier=0.7)
    _randomise(net)
    adapter_before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    hosts = {n: (layer, layer.host.module) for n, layer in net.layers.items()}
    base = {n: (mod.weight.detach().clone(), None if mod.bias is None else mod.bias.detach().clone())
            for n, (layer, mod) in hosts.items()}
    net.merge()
    for n, (layer, mod) in hosts.items():
        w0, b0 = base[n]
        w_ref, b_ref = _reference(layer, w0, b0, 0.7)
        _check_within_half_ulp(mod.weight.detach(), w_ref, w0, f"{n}.weight")
        if b0 is not None and b_ref is not None:
            _check_within_half_ulp(mod.bias.detach(), b_ref, b0, f"{n}.bias")
    # merging never writes into the adapter's own tensors (Norm's ΔW is its w_norm, reshaped)
    assert _same_bits(adapter_before, {k: v.detach() for k, v in net.state_dict().items()})
    net.unmerge()
    assert _same_bits(before, _snapshot(model))
    net.detach()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_two_merged_adapters_then_one(dtype):
    """Two adapters merged on the same layers, then one taken out: the weight is the float64 value
    of the one left (the other's contribution leaves no residue), then the original bits."""
    model = toy(dtype=dtype)
    before = _snapshot(model)
    a = _make(model, CONFIGS["lora"], multiplier=0.8)
    b = _make(model, CONFIGS["loha"], multiplier=-0.5)
    _randomise(a, 1)
    _randomise(b, 2)
    hosts = {n: (layer, layer.host.module) for n, layer in b.layers.items()}
    base = {n: mod.weight.detach().clone() for n, (layer, mod) in hosts.items()}
    a.merge()
    b.merge()
    a.unmerge()
    for n, (layer, mod) in hosts.items():
        w_ref, _ = _reference(layer, base[n], None, -0.5)
        _check_within_half_ulp(mod.weight.detach(), w_ref, base[n], n)
    b.unmerge()
    assert _same_bits(before, _snapshot(model))
    a.detach()
    b.detach()

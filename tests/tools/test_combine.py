"""lyco combine: exactly the weighted sum of the inputs' ΔW (rank concatenation), or its best
rank-r approximation with the error reported."""

from __future__ import annotations

import json

import pytest
import torch

import lyco
from lyco.adapter import Adapter
from lyco.algorithms.base import LayerSpec
from lyco.cli import main
from lyco.errors import ConfigError, FamilyMismatch
from lyco.formats.checkpoint import open_checkpoint
from lyco.tools import combine
from lyco.tools._common import weight_shape


def dense(ma, shape, w=None):
    spec = LayerSpec("conv2d" if len(shape) == 4 else "linear", tuple(shape))
    t = {k: (v.double() if v.is_floating_point() else v) for k, v in ma.tensors.items()}
    return ma.algorithm.delta_weight(t, spec, w).reshape(shape[0], -1)


def rel(a, b):
    return float((a - b).norm() / a.norm())


def weighted_sum(parts, name, shape, weights=None):
    """Σ w_i ΔW_i computed module by module, independently of the tool."""
    tot = torch.zeros(shape[0], int(torch.tensor(shape[1:]).prod()), dtype=torch.float64)
    for a, w in parts:
        if name in a.modules:
            tot += w * dense(a.modules[name], shape, None if weights is None else weights.get(name))
    return tot


def test_lora_concatenation_is_exact(algo_files, tmp_path):
    a = lyco.load(algo_files[("sd1", "lora")])          # rank 4 / conv 2, full preset
    b = lyco.load(algo_files[("sd1", "lora-dora")])     # has dora: dense path → not here
    c = lyco.load(algo_files[("sd1", "locon-tucker")])  # Tucker convs
    out = tmp_path / "ac.safetensors"
    assert main(["combine", f"{algo_files[('sd1', 'lora')]}:0.7", f"{algo_files[('sd1', 'locon-tucker')]}:-0.4",
                 "-o", str(out), "--dtype", "fp32", "--quiet"]) == 0
    m = lyco.load(out)
    assert set(m.modules) == set(a.modules) | set(c.modules) and set(m.algos()) == {"lora"}
    for n in list(m.modules)[::3]:
        shape = weight_shape(n, m.modules[n], "sd1")
        want = weighted_sum([(a, 0.7), (c, -0.4)], n, shape)
        ra = a.modules[n].tensors["lora_down.weight"].shape[0] if n in a.modules else 0
        rc = c.modules[n].tensors["lora_down.weight"].shape[0] if n in c.modules else 0
        t = m.modules[n].tensors
        assert t["lora_down.weight"].shape[0] == ra + rc and float(t["alpha"]) == ra + rc  # alpha = total rank
        assert rel(want, dense(m.modules[n], shape)) < 1e-6, n
    assert "combined by lyco" in m.metadata["ss_training_comment"]
    assert b.family == "sd1"


def test_loha_lokr_full_and_norm_combine_exactly(algo_files):
    files = [("loha", 0.5), ("lokr-full", 1.5), ("full", -1.0), ("lora", 0.25)]
    parts = [(lyco.load(algo_files[("sd1", k)]), w) for k, w in files]
    res = combine([(a, w) for a, w in parts], None, verbose=False)
    assert all(e == 0.0 for e in res.errors.values())
    hows = set(res.how.values())
    assert "lora concat (exact)" in hows and "dense sum → full (exact)" in hows
    for n in list(res.adapter.modules)[::4]:
        m = res.adapter.modules[n]
        shape = weight_shape(n, m, "sd1")
        assert rel(weighted_sum(parts, n, shape), dense(m, shape)) < 1e-6, n
    nrm = lyco.load(algo_files[("sd1", "norm")])
    r2 = combine([(nrm, 2.0), (nrm, -0.5)], None, verbose=False)
    for n, ma in nrm.modules.items():
        assert torch.allclose(r2.adapter.modules[n].tensors["w_norm"], 1.5 * ma.tensors["w_norm"], atol=1e-7)


def test_rank_cap_gives_the_optimum_of_the_sum(algo_files, tmp_path):
    parts = [(lyco.load(algo_files[("sd1", "loha")]), 1.0), (lyco.load(algo_files[("sd1", "lora")]), 0.8),
             (lyco.load(algo_files[("sd1", "full")]), 0.3)]
    res = combine([(a, w) for a, w in parts], tmp_path / "r3.safetensors", rank=3, dtype="fp32", verbose=False)
    m = lyco.load(tmp_path / "r3.safetensors")
    errs = json.loads(m.metadata["lyco.errors"])
    full_with_bias = {n for n, ma in parts[2][0].modules.items() if "diff_b" in ma.tensors}
    assert full_with_bias
    for n in list(m.modules)[::4]:
        shape = weight_shape(n, m.modules[n], "sd1")
        want = weighted_sum(parts, n, shape)
        if n in full_with_bias:  # a bias delta keeps the module Full (and exact)
            assert m.modules[n].algo == "full" and rel(want, dense(m.modules[n], shape)) < 1e-6
            continue
        s = torch.linalg.svdvals(want)
        r = min(3, min(want.shape))
        opt = float(torch.sqrt((s[r:] ** 2).sum() / (s ** 2).sum()))
        assert errs[n] == pytest.approx(opt, abs=1e-6) and res.errors[n] == pytest.approx(opt, abs=1e-9)
        assert rel(want, dense(m.modules[n], shape)) == pytest.approx(opt, abs=1e-5)
        assert m.modules[n].tensors["lora_down.weight"].shape[0] <= 3


def test_weight_dependent_modules_need_the_base(algo_files, ckpts):
    ia3 = lyco.load(algo_files[("sd1", "ia3")])
    lora = lyco.load(algo_files[("sd1", "lora")])
    with pytest.raises(ConfigError, match="--base"):
        combine([(ia3, 1.0), (lora, 1.0)], None, verbose=False)
    res = combine([(ia3, 0.6), (lora, 1.0)], None, base=ckpts["sd1"]["single"], verbose=False)
    with open_checkpoint(ckpts["sd1"]["single"]) as ck:
        for n in list(ia3.modules)[::5]:
            w = ck.get_canonical(n + ".weight").double()
            shape = tuple(w.shape)
            want = 0.6 * dense(ia3.modules[n], shape, w) + (dense(lora.modules[n], shape) if n in lora.modules else 0)
            m = res.adapter.modules[n]
            assert m.algo == "full" and rel(want, dense(m, shape)) < 1e-6


def test_family_mismatch(algo_files):
    with pytest.raises(FamilyMismatch):
        combine([algo_files[("sd1", "lora")], algo_files[("sdxl", "lora")]], None, verbose=False)
    with pytest.raises(ConfigError, match="already exists"):
        combine([algo_files[("sd1", "lora")]], algo_files[("sd1", "loha")], verbose=False)
    assert isinstance(combine([algo_files[("sd1", "lora")]], None, verbose=False).adapter, Adapter)

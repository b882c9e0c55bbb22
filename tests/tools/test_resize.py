"""lyco resize: the best rank-r approximation, the effective scale kept, kohya's dynamic rules,
the exact DyLoRA cut."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lyco
from lyco.adapter import Adapter, ModuleAdapter
from lyco.algorithms.base import LayerSpec
from lyco.algorithms.lora import truncate
from lyco.cli import main
from lyco.errors import ConfigError
from lyco.tools import resize
from lyco.tools.resize import kohya_rank


def dense(ma, shape) -> torch.Tensor:
    """ΔW of a module through its algorithm, in float64, flattened to 2-D."""
    spec = LayerSpec("conv2d" if len(shape) == 4 else "linear", tuple(shape))
    t = {k: (v.double() if v.is_floating_point() else v) for k, v in ma.tensors.items()}
    return ma.algorithm.delta_weight(t, spec).reshape(shape[0], -1)


def truncated(dw: torch.Tensor, r: int) -> tuple[torch.Tensor, float]:
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r], float(torch.sqrt((s[r:] ** 2).sum() / (s ** 2).sum()))


def shape_of(ma) -> tuple[int, ...]:
    return tuple(ma.algorithm.infer_weight_shape(ma.tensors))


def rel(a, b):
    return float((a - b).norm() / a.norm())


def test_fixed_rank_is_the_best_approximation_and_keeps_the_scale(algo_files, tmp_path):
    src = algo_files[("sd1", "lora")]  # rank 4 alpha 2 (conv: rank 2 alpha 1)
    a = lyco.load(src)
    res = resize(src, tmp_path / "r2.safetensors", rank=2, conv_rank=1, dtype="fp32", verbose=False)
    b = lyco.load(tmp_path / "r2.safetensors")
    assert set(b.modules) == set(a.modules)
    tail = tot = 0.0
    for n, ma in a.modules.items():
        shape = shape_of(ma)
        old_r, old_alpha = ma.tensors["lora_down.weight"].shape[0], float(ma.tensors["alpha"])
        new_r = 1 if len(shape) == 4 and shape[2] == 3 else 2
        mb = b.modules[n]
        assert mb.tensors["lora_down.weight"].shape[0] == new_r
        assert float(mb.tensors["alpha"]) == pytest.approx(old_alpha / old_r * new_r)  # same effective scale
        best, err = truncated(dense(ma, shape), new_r)
        assert rel(best, dense(mb, shape)) < 1e-6, n
        assert res.errors[n] == pytest.approx(err, abs=1e-9)
        dw = dense(ma, shape)
        tot += float((dw ** 2).sum())
        tail += err ** 2 * float((dw ** 2).sum())
    assert res.total_error == pytest.approx(math.sqrt(tail / tot), rel=1e-6)
    assert b.metadata["ss_network_dim"] == "2" and "resized from 4 to 2" in b.metadata["ss_training_comment"]
    assert json.loads(b.metadata["lyco.tool"])["verb"] == "resize"
    # the same rank: the same ΔW (only re-factored)
    same = resize(src, None, rank=4, conv_rank=2, verbose=False).adapter
    for n, ma in a.modules.items():
        assert rel(dense(ma, shape_of(ma)), dense(same.modules[n], shape_of(ma))) < 1e-6


def _spectral_lora(sig, out=24, inp=20, alpha=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, len(sig), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, len(sig), generator=g, dtype=torch.float64))
    r = len(sig)
    t = {"lora_up.weight": u * torch.tensor(sig, dtype=torch.float64), "lora_down.weight": v.t(),
         "alpha": torch.tensor(float(alpha if alpha is not None else r))}
    return ModuleAdapter("lora", t)


def test_kohya_dynamic_rules_hand_computed():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.1])
    # sv_ratio 4: σ > 2.5 → 2 values; clamp to [1, 5] → 2; new rank 3
    assert kohya_rank(s, "sv_ratio", 4, None) == 3
    # sv_fro 0.9: σ²/Σσ² cumulative .768 .960 .990 …; first ≥ 0.81 at position 1 → index 2 → rank 3
    assert kohya_rank(s, "sv_fro", 0.9, None) == 3
    # sv_cumulative 0.9: Σσ = 18.6; cumulative .538 .806 .914 …; first ≥ 0.9 at position 2 → rank 4
    assert kohya_rank(s, "sv_cumulative", 0.9, None) == 4
    assert kohya_rank(s, "sv_cumulative", 0.9, 2) == 2  # the cap
    assert kohya_rank(s, "sv_ratio", 1000, None) == 6  # never above the module's rank
    assert kohya_rank(torch.tensor([1e-7, 1e-8]), "sv_fro", 0.9, 8) == 1  # all but zero → rank 1
    assert kohya_rank(s, None, None, 4) == 4


def test_dynamic_rules_on_a_file(tmp_path):
    sig = [10.0, 5.0, 2.0, 1.0, 0.5, 0.1]
    a = Adapter({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": _spectral_lora(sig, alpha=3.0),
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": _spectral_lora(sig[:3], seed=1)},
                {}, "sd1")
    n1, n2 = list(a.modules)
    for kw, want1, want2 in ((dict(sv_ratio=4), 3, 3), (dict(sv_fro=0.9), 3, 3), (dict(sv_cumulative=0.9), 4, 3),
                             (dict(sv_fro=0.9, rank=2), 2, 2)):
        res = resize(a, None, verbose=False, **kw)
        assert res.ranks[n1] == (6, want1) and res.ranks[n2] == (3, want2), kw
        m = res.adapter.modules[n1]
        assert float(m.tensors["alpha"]) == pytest.approx(3.0 / 6 * want1)
        best, err = truncated(dense(a.modules[n1], (24, 20)), want1)
        assert rel(best, dense(m, (24, 20))) < 1e-6 and res.errors[n1] == pytest.approx(err, abs=1e-12)
        assert res.adapter.metadata["ss_network_dim"] == "Dynamic" or "rank" in kw
    with pytest.raises(ConfigError, match="--rank N"):
        resize(a, None, verbose=False)


def test_loha_and_lokr_become_lora(algo_files):
    for key in ("loha", "lokr", "loha-conv", "locon-tucker"):
        a = lyco.load(algo_files[("sd1", key)])
        res = resize(a, None, rank=3, verbose=False)
        for n, ma in a.modules.items():
            mb = res.adapter.modules[n]
            assert mb.algo == "lora" and "lora_mid.weight" not in mb.tensors
            shape = shape_of(mb)
            assert len(shape) == (4 if mb.tensors["lora_down.weight"].dim() == 4 else 2)
            dw = dense(ma, shape)
            r = min(3, min(dw.shape))
            best, err = truncated(dw, r)
            assert rel(best, dense(mb, shape)) < 1e-6, (key, n)
            assert res.errors[n] == pytest.approx(err, abs=1e-7)


def test_dora_keeps_its_magnitude_and_others_are_copied(algo_files):
    a = lyco.load(algo_files[("sd1", "lora-dora")])
    res = resize(a, None, rank=1, verbose=False)
    for n, ma in a.modules.items():
        assert torch.equal(res.adapter.modules[n].tensors["dora_scale"], ma.tensors["dora_scale"])
        assert res.adapter.modules[n].tensors["lora_down.weight"].shape[0] == 1
    ia3 = lyco.load(algo_files[("sd1", "ia3")])
    res = resize(ia3, None, rank=1, verbose=False)
    assert res.ranks == {} and len(res.kept) == len(ia3.modules)
    for n, ma in ia3.modules.items():
        assert res.adapter.modules[n] is ma


def test_dylora_prefix_cut_is_exact(algo_files, tmp_path):
    src = algo_files[("sd1", "lora")]
    a = lyco.load(src)
    assert main(["resize", str(src), "-o", str(tmp_path / "p.safetensors"), "--prefix", "3", "--quiet"]) == 0
    b = lyco.load(tmp_path / "p.safetensors")
    for n, ma in a.modules.items():
        want = truncate(ma.tensors, 3) if ma.tensors["lora_down.weight"].shape[0] > 3 else ma.tensors
        for k, v in want.items():
            assert torch.equal(b.modules[n].tensors[k], v.to(b.modules[n].tensors[k].dtype)), (n, k)
    with pytest.raises(ConfigError, match="exact DyLoRA cut"):
        resize(src, None, prefix=3, rank=2, verbose=False)

"""lyco extract: known differences are recovered; the error is the truncated-SVD optimum; the rank
rules do what they say."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lyco
from lyco.cli import main
from lyco.errors import ConfigError, FamilyMismatch
from lyco.models import tiny
from lyco.tools import extract
from lyco.tools.extract import _lora_layer, nearest_kronecker, select_rank

TO_Q = "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q"      # Linear 32×32
PROJ_IN = "unet.down_blocks.2.attentions.0.proj_in"                             # 1×1 conv 32×32 (SD1)
FF = "unet.down_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj"       # Linear 256×32
CONV = "unet.down_blocks.2.resnets.0.conv1"                                    # 3×3 conv 32×16
FC1 = "text_encoder.text_model.encoder.layers.0.mlp.fc1"                       # Linear 64×32
K_PROJ = "text_encoder.text_model.encoder.layers.1.self_attn.k_proj"           # Linear 32×32


def _module(pipe, name):
    comp, path = name.split(".", 1)
    model = getattr(pipe, comp)
    if not hasattr(model, "text_model"):
        path = path.removeprefix("text_model.")
    return model.get_submodule(path)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    pipe = tiny.tiny_pipeline("sd1", seed=0)  # fp32
    d = tmp_path_factory.mktemp("extract")
    return pipe, tiny.save_tiny_single_file(pipe, d / "base.safetensors"), d


def make_tuned(pipe, path, deltas):
    """The pipe with ``deltas`` ({module: ΔW}) added, saved as a single file; the pipe is restored."""
    saved = {}
    try:
        with torch.no_grad():
            for name, dw in deltas.items():
                w = _module(pipe, name).weight
                saved[name] = w.detach().clone()
                w.add_(dw.reshape(w.shape).to(w.dtype))
        return tiny.save_tiny_single_file(pipe, path)
    finally:
        with torch.no_grad():
            for name, w0 in saved.items():
                _module(pipe, name).weight.copy_(w0)


def file_delta(base, tuned, name) -> torch.Tensor:
    """W_tuned − W_base as the files hold them (float64), read independently of lyco.tools."""
    from lyco.formats.checkpoint import open_checkpoint
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        return t.get_canonical(name + ".weight").double() - b.get_canonical(name + ".weight").double()


def shape_of(pipe, name):
    return tuple(_module(pipe, name).weight.shape)


def low_rank(shape, r, gen, scale=0.1):
    out, fin = shape[0], math.prod(shape[1:])
    return ((torch.randn(out, r, generator=gen) @ torch.randn(r, fin, generator=gen)) * scale).reshape(shape)


def delta_of(ma, shape) -> torch.Tensor:
    return ma.algorithm.delta_weight({k: v.double() for k, v in ma.tensors.items()},
                                     lyco.algorithms.LayerSpec("conv2d" if len(shape) == 4 else "linear", shape))


def rel(a, b):
    return float((a.double() - b.double()).norm() / a.double().norm())


def opt_error(dw, r):
    s = torch.linalg.svdvals(dw.double().reshape(dw.shape[0], -1))
    return float(torch.sqrt((s[r:] ** 2).sum() / (s ** 2).sum()))


def test_known_low_rank_difference_is_recovered(sd1):
    pipe, base, d = sd1
    g = torch.Generator().manual_seed(1)
    names = (TO_Q, PROJ_IN, FF, CONV, FC1, K_PROJ)
    deltas = {n: low_rank(shape_of(pipe, n), 3, g) for n in names}
    tuned = make_tuned(pipe, d / "t_lowrank.safetensors", deltas)
    res = extract(base, tuned, d / "ext.safetensors", algo="locon", rank=3, dtype="fp32", min_diff=1e-4,
                  progress=False, verbose=False)
    a = lyco.load(d / "ext.safetensors")
    assert set(a.modules) == set(names)  # unchanged layers are left out
    for n in names:
        assert a.modules[n].algo == "lora" and a.modules[n].tensors["lora_down.weight"].shape[0] == 3
        shape = shape_of(pipe, n)
        assert tuple(a.modules[n].tensors["lora_down.weight"].shape[1:]) == shape[1:]  # conv layout kept
        assert rel(file_delta(base, tuned, n), delta_of(a.modules[n], shape)) < 2e-6, n
        assert res.errors[n] < 2e-6
    assert json.loads(a.metadata["lyco.errors"]).keys() == set(names)
    assert a.metadata["ss_network_dim"] == "3" and a.family == "sd1"
    # algo lora: k×k convs only with --conv-rank
    r2 = extract(base, tuned, None, algo="lora", rank=3, dtype="fp32", min_diff=1e-4, progress=False, verbose=False)
    assert CONV not in r2.adapter.modules and PROJ_IN in r2.adapter.modules
    r3 = extract(base, tuned, None, algo="lora", rank=3, conv_rank=2, dtype="fp32", min_diff=1e-4,
                 progress=False, verbose=False)
    assert r3.ranks[CONV] == 2 and r3.errors[CONV] > 0.01


def test_error_equals_the_truncated_svd_optimum(sd1):
    pipe, base, d = sd1
    g = torch.Generator().manual_seed(2)
    names = (TO_Q, FF, CONV, FC1)
    deltas = {n: torch.randn(shape_of(pipe, n), generator=g) * 0.05 for n in names}
    tuned = make_tuned(pipe, d / "t_dense.safetensors", deltas)
    for exact in (True, False):
        res = extract(base, tuned, None, algo="locon", rank=4, exact_svd=exact, dtype="fp32", min_diff=0,
                      progress=False, verbose=False)
        for n in names:
            dw = file_delta(base, tuned, n)
            opt = opt_error(dw, 4)
            got = rel(dw, delta_of(res.adapter.modules[n], shape_of(pipe, n)))
            assert opt - 1e-6 <= got <= opt + 1e-6, (n, exact, got, opt)
            assert abs(res.errors[n] - got) < 1e-6


def test_randomised_svd_is_near_optimal_on_large_layers():
    g = torch.Generator().manual_seed(3)
    # a decaying spectrum plus noise, and a flat one (the randomised method's worst case)
    decay = ((torch.randn(300, 64, generator=g) * torch.logspace(0, -2, 64)) @ torch.randn(64, 400, generator=g)
             + 0.003 * torch.randn(300, 400, generator=g))
    flat = torch.randn(300, 400, generator=g)
    exact_low = torch.randn(300, 6, generator=g) @ torch.randn(6, 400, generator=g)
    for dw, r, slack in ((decay, 8, 1.0005), (flat, 8, 1.01), (exact_low, 6, None)):
        res = _lora_layer(dw, (300, 400), "rank", r, r, False, 0.5, False, torch.float32)
        approx = res.tensors["lora_up.weight"].double() @ res.tensors["lora_down.weight"].double()
        got, opt = rel(dw, approx), opt_error(dw, r)
        if slack is None:
            assert got < 1e-5  # exactly low rank: recovered to fp32 precision
        else:
            assert opt * (1 - 1e-6) <= got <= opt * slack


def test_rank_rules_hand_computed():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])
    # ratio: σ > 0.15·10 = 1.5 → 10, 5, 2
    assert select_rank(s, "ratio", 0.15) == 3
    assert select_rank(s, "ratio", 0.5) == 1  # σ > 5 is strict
    assert select_rank(s, "threshold", 1.0) == 3 and select_rank(s, "threshold", 0.4) == 5
    # energy: Σσ² = 130.25; 100 (76.8%), 125 (96.0%), 129 (99.04%) → 3 keeps ≥ 99%
    assert select_rank(s, "energy", 0.99) == 3 and select_rank(s, "energy", 0.95) == 2
    assert select_rank(s, "energy", 0.5) == 1 and select_rank(s, "energy", 1.0) == 5
    # energy with a partial spectrum: the total comes from ‖ΔW‖²
    assert select_rank(s[:2], "energy", 0.95, total2=130.25) == 2
    assert select_rank(s[:2], "energy", 0.99, total2=130.25) == 3  # not reached within two values
    # quantile (LyCORIS): cumsum 10, 15, 17, 18, 18.5; 0.9·18.5 = 16.65 → two sums below
    assert select_rank(s, "quantile", 0.9) == 2 and select_rank(s, "quantile", 0.5) == 0
    assert select_rank(s, "rank", 4) == 4


def test_rank_rules_end_to_end(sd1):
    pipe, base, d = sd1
    g = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(64, 5, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(32, 5, generator=g, dtype=torch.float64))
    sig = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5], dtype=torch.float64) * 0.02
    dw = (u * sig) @ v.t()
    tuned = make_tuned(pipe, d / "t_rules.safetensors", {FC1: dw.float()})
    dw = file_delta(base, tuned, FC1)  # what the files hold (fp32 rounding of W + ΔW)
    for kw, want in ((dict(energy=0.99), 3), (dict(ratio=0.15), 3), (dict(threshold=1.5 * 0.02), 3),
                     (dict(quantile=0.9), 2), (dict(rank=4), 4), (dict(energy=0.95, max_rank=1), 1)):
        res = extract(base, tuned, None, full_ratio=1.01, min_diff=0, dtype="fp32", progress=False,
                      verbose=False, **kw)
        assert list(res.adapter.modules) == [FC1] and res.ranks[FC1] == want, kw
        assert abs(res.errors[FC1] - opt_error(dw, want)) < 1e-5
    # close to full rank: stored exactly as diff
    res = extract(base, tuned, None, rank=20, min_diff=0, dtype="fp32", progress=False, verbose=False)
    m = res.adapter.modules[FC1]
    assert m.algo == "full" and res.errors[FC1] < 1e-6 and rel(dw, m.tensors["diff"]) < 1e-6
    with pytest.raises(ConfigError, match="exactly one rank rule"):
        extract(base, tuned, None, rank=2, energy=0.9, progress=False, verbose=False)


def test_unchanged_text_encoder_is_left_out(sd1, capsys):
    pipe, base, d = sd1
    g = torch.Generator().manual_seed(5)
    deltas = {TO_Q: low_rank(shape_of(pipe, TO_Q), 2, g),
              FC1: torch.full(shape_of(pipe, FC1), 1e-3) * torch.sign(torch.randn(shape_of(pipe, FC1), generator=g))}
    tuned = make_tuned(pipe, d / "t_te.safetensors", deltas)
    res = extract(base, tuned, None, rank=2, dtype="fp32", progress=False)  # default --min-diff 0.01
    assert list(res.adapter.modules) == [TO_Q] and "text encoder unchanged" in res.skipped[FC1]
    assert "text_encoder: unchanged" in capsys.readouterr().err
    res = extract(base, tuned, None, rank=2, dtype="fp32", min_diff=1e-4, progress=False, verbose=False)
    assert set(res.adapter.modules) == {TO_Q, FC1}


def test_lokr_nearest_kronecker(sd1):
    pipe, base, d = sd1
    g = torch.Generator().manual_seed(6)
    # FC1 64×32: LyCORIS splits 64 = 8·8 and 32 = 4·8; W2 of rank 2 → stored low-rank
    w1 = torch.randn(8, 4, generator=g)
    w2 = torch.randn(8, 2, generator=g) @ torch.randn(2, 8, generator=g)
    # CONV 32×16×3×3: 32 = 4·8, 16 = 4·4; the kernel stays in W2 (8, 4, 3, 3), stored full
    c1 = torch.randn(4, 4, generator=g)
    c2 = torch.randn(8, 4, 3, 3, generator=g)
    deltas = {FC1: torch.kron(w1, w2) * 0.1, CONV: torch.kron(c1, c2.reshape(8, -1)).reshape(32, 16, 3, 3) * 0.1,
              TO_Q: torch.randn(32, 32, generator=g) * 0.05}
    tuned = make_tuned(pipe, d / "t_kron.safetensors", deltas)
    res = extract(base, tuned, d / "lokr.safetensors", algo="lokr", rank=2, conv_rank=8, dtype="fp32",
                  min_diff=0, progress=False, verbose=False)
    a = lyco.load(d / "lokr.safetensors")
    t = a.modules[FC1].tensors
    assert set(t) >= {"lokr_w1", "lokr_w2_a", "lokr_w2_b"} and t["lokr_w1"].shape == (8, 4)
    assert "lokr_w2" in a.modules[CONV].tensors and a.modules[CONV].tensors["lokr_w2"].shape == (8, 4, 3, 3)
    for n in (FC1, CONV):
        assert rel(file_delta(base, tuned, n), delta_of(a.modules[n], shape_of(pipe, n))) < 1e-5, n
    # a general ΔW: the error is the nearest-Kronecker optimum, computed here block by block
    dw = file_delta(base, tuned, TO_Q)  # 32 = 4·8 on both sides
    rows = torch.stack([dw[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8].reshape(-1) for i in range(4) for j in range(4)])
    s = torch.linalg.svdvals(rows)
    res8 = extract(base, tuned, None, algo="lokr", rank=8, min_diff=0, dtype="fp32", progress=False, verbose=False)
    assert abs(res8.errors[TO_Q] - float(torch.sqrt(1 - s[0] ** 2 / (s ** 2).sum()))) < 1e-5
    w1n, w2n, err2 = nearest_kronecker(dw.float(), (4, 8), (4, 8))
    assert abs(err2 - float((s[1:] ** 2).sum())) < 1e-6 * float((s ** 2).sum())
    assert res.errors[TO_Q] >= res8.errors[TO_Q] - 1e-7


def test_tucker_core_for_kxk_convs(sd1):
    pipe, base, d = sd1
    g = torch.Generator().manual_seed(7)
    core = torch.randn(3, 3, 3, 3, generator=g)
    uo, _ = torch.linalg.qr(torch.randn(32, 3, generator=g))
    ui, _ = torch.linalg.qr(torch.randn(16, 3, generator=g))
    dw = torch.einsum("ijhw,oi,cj->ochw", core, uo, ui) * 0.2
    tuned = make_tuned(pipe, d / "t_tucker.safetensors", {CONV: dw})
    res = extract(base, tuned, None, algo="locon", rank=3, tucker=True, dtype="fp32", progress=False, verbose=False)
    t = res.adapter.modules[CONV].tensors
    assert t["lora_mid.weight"].shape == (3, 3, 3, 3) and t["lora_down.weight"].shape == (3, 16, 1, 1)
    actual = file_delta(base, tuned, CONV)
    assert rel(actual, delta_of(res.adapter.modules[CONV], (32, 16, 3, 3))) < 2e-6 and res.errors[CONV] < 2e-6


def test_family_mismatch_and_cli(sd1, ckpts, tmp_path, capsys):
    pipe, base, d = sd1
    with pytest.raises(FamilyMismatch):
        extract(base, ckpts["sdxl"]["single"], None, rank=2, progress=False, verbose=False)
    g = torch.Generator().manual_seed(8)
    tuned = make_tuned(pipe, d / "t_cli.safetensors", {TO_Q: low_rank((32, 32), 2, g)})
    out = tmp_path / "cli.safetensors"
    assert main(["extract", str(base), str(tuned), "-o", str(out), "--rank", "2", "--dtype", "fp16"]) == 0
    err = capsys.readouterr().err
    assert TO_Q in err and "rel.err" in err
    a = lyco.load(out)
    assert a.modules[TO_Q].tensors["lora_up.weight"].dtype == torch.float16
    assert main(["extract", str(base), str(tuned), "-o", str(base), "--rank", "2"]) == 2
    assert "is the input" in capsys.readouterr().err

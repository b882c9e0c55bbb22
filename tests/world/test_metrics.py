"""The evaluation metrics on constructed cases whose answer is known in closed form, and against an
independent computation (brute-force loops, SVD instead of the kernel's eigen-decomposition)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lyco.world import metrics as M


def _orthogonal(n, d, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q[:n]


# ---------------------------------------------------------------- Vendi / diversity

def test_vendi_identical_is_one_and_orthogonal_is_n():
    f = np.tile(np.random.default_rng(1).normal(size=(1, 16)), (6, 1)) * np.arange(1, 7)[:, None]  # same direction
    assert M.vendi_score(f) == pytest.approx(1.0, abs=1e-9)
    for n in (2, 5, 8):
        assert M.vendi_score(_orthogonal(n, 12) * 3.0) == pytest.approx(n, rel=1e-9)


def test_vendi_of_k_orthogonal_clusters_is_k():
    # k mutually orthogonal directions, each repeated m times: effective number of samples k
    base = _orthogonal(3, 10, seed=2)
    f = np.repeat(base, 4, axis=0)
    assert M.vendi_score(f) == pytest.approx(3.0, rel=1e-9)
    # unequal clusters (sizes 1 and 3): eigenvalues 1/4 and 3/4 -> exp(entropy)
    f2 = np.concatenate([base[:1], np.repeat(base[1:2], 3, axis=0)])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert M.vendi_score(f2) == pytest.approx(math.exp(h), rel=1e-9)


def test_vendi_matches_svd_computation_and_grows_with_spread():
    rng = np.random.default_rng(3)
    centre = rng.normal(size=24)
    prev = 0.0
    for spread in (0.01, 0.3, 1.0, 5.0):
        f = centre + spread * rng.normal(size=(8, 24))
        # independent: eigenvalues of K/n = squared singular values of the unit rows / sqrt(n)
        u = torch.tensor(f, dtype=torch.float64)
        u = u / u.norm(dim=1, keepdim=True)
        lam = torch.linalg.svdvals(u / math.sqrt(len(f))) ** 2
        lam = lam[lam > 1e-15]
        ref = math.exp(float(-(lam * lam.log()).sum()))
        v = M.vendi_score(torch.tensor(f, dtype=torch.float32))  # torch input accepted
        assert v == pytest.approx(ref, rel=1e-5)
        assert v > prev  # more spread, more diversity
        prev = v
    assert 1.0 <= prev <= 8.0


def test_pairwise_distance_brute_force():
    f = np.random.default_rng(4).normal(size=(5, 7))
    ref = np.mean([1 - f[i] @ f[j] / np.linalg.norm(f[i]) / np.linalg.norm(f[j])
                   for i, j in itertools.combinations(range(5), 2)])
    assert M.mean_pairwise_distance(f) == pytest.approx(ref, rel=1e-12)
    assert M.mean_pairwise_distance(_orthogonal(4, 4)) == pytest.approx(1.0)
    assert M.mean_pairwise_distance(np.ones((3, 4))) == pytest.approx(0.0, abs=1e-12)


def test_diversity_is_per_prompt():
    same = np.tile([[1.0, 2.0, 0.0, 0.0]], (4, 1))          # prompt "a": 4 identical seeds
    orth = _orthogonal(4, 4, seed=5)                          # prompt "b": 4 orthogonal seeds
    f = np.concatenate([same, orth])
    d = M.diversity(f, ["a"] * 4 + ["b"] * 4)
    assert d["vendi"] == pytest.approx((1 + 4) / 2)
    assert d["vendi_norm"] == pytest.approx((0 + 1) / 2)
    assert d["pairwise"] == pytest.approx((0 + 1) / 2)
    # interleaved group labels give the same answer
    order = [0, 4, 1, 5, 2, 6, 3, 7]
    d2 = M.diversity(f[order], [("a" if i < 4 else "b") for i in order])
    assert d2 == pytest.approx(d)
    # one group over everything is not the same thing
    assert M.diversity(f)["vendi"] != pytest.approx(d["vendi"])


def test_diversity_errors():
    with pytest.raises(ValueError, match="all-zero"):
        M.vendi_score(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="group labels"):
        M.diversity(np.ones((3, 4)), ["a", "b"])


# ---------------------------------------------------------------- fidelity / controllability

def test_fidelity_counts_concept_hits():
    assert M.fidelity(["star"] * 8, "star") == 1.0
    assert M.fidelity(["circle", "square"] * 4, "star") == 0.0
    assert M.fidelity(["star", "star", "star", "circle"], "star") == 0.75
    with pytest.raises(TypeError):
        M.fidelity("star", "star")
    with pytest.raises(ValueError, match="no samples"):
        M.fidelity([], "star")


def test_controllability_per_attribute_and_mean():
    prompted = {"colour": ["red", "blue", "green", "red"], "background": ["white", "black", "white", "grey"]}
    good = {"colour": list(prompted["colour"]), "background": list(prompted["background"]), "shape": ["star"] * 4}
    c = M.controllability(good, prompted)
    assert c == {"colour": 1.0, "background": 1.0, "mean": 1.0}
    bad = {"colour": ["red", "red", "red", "red"], "background": ["black"] * 4}   # colour 2/4, background 1/4
    c = M.controllability(bad, prompted)
    assert c["colour"] == 0.5 and c["background"] == 0.25 and c["mean"] == pytest.approx(0.375)
    with pytest.raises(KeyError, match="background"):
        M.controllability({"colour": good["colour"]}, prompted)
    with pytest.raises(ValueError, match="4 predictions but 3"):
        M.controllability(good, {"colour": ["red"] * 3, "background": ["white"] * 3})


# ---------------------------------------------------------------- preservation

def test_preservation_identical_is_one_and_moves_down():
    rng = np.random.default_rng(6)
    imgs = rng.uniform(-1, 1, size=(6, 3, 8, 8))
    feats = rng.normal(size=(6, 5))
    labels = {"shape": ["circle", "square", "triangle"] * 2, "colour": ["red"] * 6}
    p = M.preservation(labels, labels, images=imgs, base_images=imgs.copy(), features=feats, base_features=feats)
    assert p == pytest.approx({"shape": 1.0, "colour": 1.0, "agreement": 1.0, "all_heads": 1.0,
                               "pixel": 1.0, "feature": 1.0})
    changed = {"shape": ["circle", "circle", "triangle"] * 2, "colour": ["red"] * 5 + ["blue"]}
    p2 = M.preservation(changed, labels, images=-imgs, base_images=imgs)
    assert p2["shape"] == pytest.approx(4 / 6) and p2["colour"] == pytest.approx(5 / 6)
    assert p2["agreement"] == pytest.approx((4 / 6 + 5 / 6) / 2)
    # samples 1, 4 differ in shape and 5 in colour: 3 of 6 agree on every head
    assert p2["all_heads"] == pytest.approx(3 / 6)
    assert p2["pixel"] == pytest.approx(1 - np.abs(2 * imgs).mean() / 2)
    assert p2["pixel"] < p["pixel"]


def test_pixel_similarity_extremes_and_torch_input():
    x = torch.where(torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5, 1.0, -1.0)
    assert M.pixel_similarity(x, x) == 1.0
    assert M.pixel_similarity(x, -x) == pytest.approx(0.0)
    assert M.pixel_similarity(x, torch.zeros_like(x)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        M.pixel_similarity(x, x[:1])


# ---------------------------------------------------------------- quality

def test_quality_confidence_and_prompt_accuracy():
    onehot = np.eye(4)[[0, 1, 2, 3, 0]]
    uniform = np.full((5, 4), 0.25)
    assert M.quality({"shape": onehot})["confidence"] == pytest.approx(1.0)
    assert M.quality({"shape": uniform})["confidence"] == pytest.approx(0.25)
    assert M.quality({"shape": onehot, "colour": uniform})["confidence"] == pytest.approx(0.625)
    pred = {"shape": ["a", "b", "c", "d", "a"], "colour": ["red"] * 5}
    prompted = {"shape": ["a", "b", "c", "x", "a"], "colour": ["red", "red", "blue", "red", "red"]}
    q = M.quality({"shape": onehot}, pred, prompted)
    assert q["acc_shape"] == pytest.approx(4 / 5) and q["acc_colour"] == pytest.approx(4 / 5)
    assert q["prompt_accuracy"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="probabilities"):
        M.quality({"shape": onehot * 2})

"""The world classifier without its shipped weights: heads, predict/features contracts, save/load,
agreement arithmetic, and that a short training run learns (the easy heads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lyco.world import classifier as C
from lyco.world import scene

torch.set_num_threads(1)


def test_heads_cover_the_full_world():
    assert C.HEADS["shape"] == scene.ALL_SHAPES and "star" in C.HEADS["shape"]
    assert set(C.HEADS["colour"]) == set(scene.COLOURS)
    assert set(C.HEADS["background"]) == set(scene.BACKGROUNDS)
    assert C.HEADS["texture"] == scene.TEXTURES and "stripes" in C.HEADS["texture"]
    attrs = [scene.Attrs("star", "orange", "teal", "stripes"), scene.Attrs("circle", "red", "white")]
    lab = C.labels_of(attrs)
    assert [C.HEADS[h][int(lab[h][0])] for h in C.HEADS] == ["star", "orange", "teal", "stripes"]
    assert [C.HEADS[h][int(lab[h][1])] for h in C.HEADS] == ["circle", "red", "white", "plain"]


def test_small_enough():
    n = sum(p.numel() for p in C.Classifier().parameters())
    assert n * 4 < 2_000_000, n  # "a few hundred KB" to ~1 MB in fp32


def test_predict_and_features_contracts():
    torch.manual_seed(0)
    clf = C.Classifier()
    x = scene.render_batch(scene.sample_attrs_batch(5, 1, world="full"), 1)
    pred = clf.predict(x)
    assert set(pred) == set(C.HEADS)
    for h, (labels, probs) in pred.items():
        assert labels.dtype == torch.long and labels.shape == (5,)
        assert probs.shape == (5, len(C.HEADS[h]))
        assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-5)
        assert torch.equal(labels, probs.argmax(-1))
        # probabilities are the softmax of the head's logits on the features
        with torch.no_grad():
            logits = clf.out[h](clf.features(x))
        assert torch.allclose(probs, logits.softmax(-1), atol=1e-6)
    f = clf.features(x)
    assert f.shape == (5, clf.feature_dim)
    # other sizes are resized to the world's
    big = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    assert clf.predict(big)["shape"][1].shape == (5, len(C.HEADS["shape"]))
    with pytest.raises(ValueError, match="N×3×H×W"):
        clf.predict(x[:, :1])
    assert len(clf.predict_attrs(x)) == 5


def test_agreement_counts_matches(monkeypatch):
    clf = C.Classifier()
    attrs = [scene.Attrs("circle", "red", "white"), scene.Attrs("star", "blue", "black"),
             scene.Attrs("square", "green", "gray")]
    fake = {h: (C.labels_of(attrs)[h].clone(), None) for h in C.HEADS}
    fake["shape"][0][1] = 0          # star predicted as circle
    fake["colour"][0][2] = 0         # green predicted as red
    monkeypatch.setattr(clf, "predict", lambda images: fake)
    got = C.agreement(clf, torch.zeros(3, 3, 32, 32), attrs)
    assert got["shape"] == pytest.approx(2 / 3) and got["colour"] == pytest.approx(2 / 3)
    assert got["background"] == 1.0 and got["texture"] == 1.0
    assert got["all"] == pytest.approx(1 / 3)
    only = C.agreement(clf, torch.zeros(3, 3, 32, 32), attrs, heads=["background", "shape"])
    assert set(only) == {"background", "shape", "all"} and only["all"] == pytest.approx(2 / 3)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    clf = C.Classifier()
    p = C.save(clf, tmp_path / "clf.safetensors", recipe={"steps": 0})
    back = C.load(weights=p)
    x = scene.render_batch(scene.sample_attrs_batch(4, 2, world="full"), 2)
    for h in C.HEADS:
        assert torch.equal(clf.predict(x)[h][1], back.predict(x)[h][1])
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        C.load(weights=tmp_path / "missing.safetensors")


def test_missing_shipped_weights_name_the_script(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "WEIGHTS", tmp_path / "classifier.safetensors")
    assert not C.is_trained()
    with pytest.raises(FileNotFoundError, match="lyco.world.pretrain"):
        C.load()


def test_wrong_heads_are_rejected(tmp_path):
    from safetensors.torch import save_file
    import json

    clf = C.Classifier(heads={"shape": ("circle", "square")})
    sd = {k: v.contiguous() for k, v in clf.state_dict().items()}
    p = tmp_path / "c.safetensors"
    save_file(sd, str(p), metadata={"lyco.world.heads": json.dumps(clf.heads),
                                    "lyco.world.widths": json.dumps(list(clf.widths))})
    with pytest.raises(ValueError, match="heads"):
        C.load(weights=p)


def test_augment_keeps_range_and_is_seeded():
    x = scene.render_batch(scene.sample_attrs_batch(6, 0), 0)
    a = C.augment(x, torch.Generator().manual_seed(3))
    b = C.augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    assert not torch.equal(a, x)


@pytest.mark.slow
def test_short_training_learns_the_easy_heads():
    """Backgrounds and colours are flat colour fields: 60 steps of 32 images already separate
    backgrounds (chance 1/4) and lift colours well above an untrained network (chance 1/6); shapes
    take longer (the shipped classifier: ≥ 95 % on every head, tests/world/test_pretrained.py)."""
    torch.manual_seed(0)
    untrained = C.accuracy(C.Classifier(), n=200, seed=5)
    clf = C.train_classifier(60, seed=0, batch=32, lr=3e-3)
    acc = C.accuracy(clf, n=200, seed=5)
    assert acc["background"] > 0.9, acc
    assert acc["colour"] > 0.35 and acc["colour"] > untrained["colour"] + 0.2, (acc, untrained)
    assert untrained["background"] < 0.6, untrained

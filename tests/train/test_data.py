"""Data: folders and repeats, captions (trigger, shuffle/keep_tokens, dropout), buckets, batches,
latent cache."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest
import torch
from PIL import Image

from lyco.errors import ConfigError
from lyco.train import data as D
from lyco.train.synthetic import make_shapes

TAGS = "red circle, blue background, large, centered"


# ----------------------------------------------------------------------------- captions

def test_trigger_word_goes_first_once():
    rng = random.Random(0)
    assert D.process_caption(TAGS, rng, trigger_word="lyco") == "lyco, red circle, blue background, large, centered"
    assert D.process_caption("a, lyco, b", rng, trigger_word="lyco") == "lyco, a, b"


def test_keep_tokens_stay_in_place_and_the_rest_is_shuffled():
    seen = set()
    for seed in range(200):
        out = D.process_caption(TAGS, random.Random(seed), trigger_word="lyco", shuffle=True, keep_tokens=2)
        tags = D.split_tags(out)
        assert tags[:2] == ["lyco", "red circle"]
        assert sorted(tags[2:]) == sorted(["blue background", "large", "centered"])
        seen.add(tuple(tags[2:]))
    assert len(seen) == 6  # every permutation of the 3 free tags occurs


def test_no_shuffle_keeps_order_and_same_seed_same_caption():
    assert D.process_caption(TAGS, random.Random(1), keep_tokens=1) == TAGS
    a = [D.process_caption(TAGS, random.Random(s), shuffle=True, tag_dropout_rate=0.3) for s in range(50)]
    b = [D.process_caption(TAGS, random.Random(s), shuffle=True, tag_dropout_rate=0.3) for s in range(50)]
    assert a == b and len(set(a)) > 5


def test_caption_dropout_rates():
    n = 2000
    dropped = sum(D.process_caption(TAGS, random.Random(s), dropout_rate=0.25) == "" for s in range(n))
    assert abs(dropped / n - 0.25) < 0.04
    assert all(D.process_caption(TAGS, random.Random(s), dropout_rate=0.0) == TAGS for s in range(100))
    assert all(D.process_caption(TAGS, random.Random(s), dropout_rate=1.0) == "" for s in range(100))
    assert D.process_caption(TAGS, random.Random(0), drop_all=True) == ""


def test_tag_dropout_never_drops_kept_tags():
    kept = Counter()
    n = 2000
    for s in range(n):
        tags = D.split_tags(D.process_caption(TAGS, random.Random(s), keep_tokens=1, tag_dropout_rate=0.5))
        assert tags[0] == "red circle"
        kept.update(tags[1:])
    for t in ("blue background", "large", "centered"):
        assert abs(kept[t] / n - 0.5) < 0.05


def test_dataset_epoch_dropout_and_reg_without_trigger(tmp_path):
    make_shapes(tmp_path / "3_thing", 2, sizes=((32, 32),))
    make_shapes(tmp_path / "reg" / "1_r", 1, seed=9, style="plain", sizes=((32, 32),))
    items = [it for s in D.scan(str(tmp_path)) for it in s.items]
    reg = [it for s in D.scan(str(tmp_path / "reg"), is_reg=True) for it in s.items]
    ds = D.TrainDataset(items + reg, seed=0, captions=D.CaptionOptions(trigger_word="lyco",
                        dropout_every_n_epochs=2), flip_aug=False, cache=None)
    assert ds.caption_for(items[0], random.Random(0), epoch=0).startswith("lyco, ")
    assert ds.caption_for(items[0], random.Random(0), epoch=1) == ""  # every 2nd epoch (1-based)
    assert "lyco" not in ds.caption_for(reg[0], random.Random(0), epoch=0)


# ----------------------------------------------------------------------------- folders

def test_scan_repeat_folders_captions_and_errors(tmp_path):
    make_shapes(tmp_path / "10_lycoshape", 3, sizes=((32, 32),))
    make_shapes(tmp_path / "2_other thing", 2, seed=1, sizes=((64, 32),))
    make_shapes(tmp_path, 1, seed=2, sizes=((32, 32),))  # direct images use `repeats`
    (tmp_path / "2_other thing" / "concept_001.txt").unlink()  # uncaptioned → class name
    (tmp_path / "notes").mkdir()
    make_shapes(tmp_path / "notes", 1, sizes=((32, 32),))  # not N_name: ignored
    subsets = D.scan(str(tmp_path), repeats=4)
    by = {s.folder.rsplit("/", 1)[-1]: s for s in subsets}
    assert set(by) == {tmp_path.name, "10_lycoshape", "2_other thing"}
    assert by["10_lycoshape"].repeats == 10 and len(by["10_lycoshape"].items) == 3
    assert by[tmp_path.name].repeats == 4
    caps = {it.path.rsplit("/", 1)[-1]: it.caption for it in by["2_other thing"].items}
    assert caps["concept_001.png"] == "other thing"
    assert "background" in caps["concept_000.png"]
    assert by["2_other thing"].items[0].size == (64, 32)
    dirs = D.dataset_dirs(subsets)
    assert dirs["10_lycoshape"] == {"n_repeats": 10, "img_count": 3}
    freq = D.tag_frequency(subsets)
    assert sum(freq["10_lycoshape"].values()) == 3 * 4  # 4 tags per caption
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no images"):
        D.scan(str(empty))
    with pytest.raises(ConfigError, match="not a folder"):
        D.scan(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- buckets

def test_make_buckets_properties():
    b = D.make_buckets((512, 512), 256, 1024, 64)
    assert (512, 512) in b
    for w, h in b:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= 512 * 512
    assert (1024, 256) in b and (256, 1024) in b
    assert (640, 384) in b and (384, 640) in b  # wide and tall ones of about the same area


def test_nearest_bucket_follows_the_aspect_ratio():
    b = D.make_buckets((512, 512), 256, 1024, 64)
    assert D.nearest_bucket((1000, 1000), b) == (512, 512)
    w, h = D.nearest_bucket((1600, 900), b)
    assert w > h and abs(math.log(w / h) - math.log(16 / 9)) < 0.15
    w, h = D.nearest_bucket((900, 1600), b)
    assert h > w
    assert D.nearest_bucket((4000, 100), b) == (1024, 256)


def test_no_upscale_bucket():
    assert D.no_upscale_bucket((300, 200), (512, 512), 64) == (256, 192)
    w, h = D.no_upscale_bucket((2000, 1000), (512, 512), 64)
    assert w * h <= 512 * 512 and w > h and w % 64 == 0 and h % 64 == 0


def test_fit_to_bucket_resizes_and_centre_crops():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 50, 100))  # red left quarter, cropped away for a square
    out, (top, left) = D.fit_to_bucket(img, (64, 64))
    assert out.size == (64, 64)
    assert (top, left) == (0, 32)
    assert out.getpixel((0, 32))[0] < 30  # the left edge of the crop is black, not red
    assert D._crop_of((200, 100), (64, 64)) == (top, left)
    t = D.image_to_tensor(out)
    assert t.shape == (3, 64, 64) and -1.0 <= float(t.min()) and float(t.max()) <= 1.0


def test_assign_buckets_without_bucketing():
    items = [D.ImageItem("a", "", 1, False, "", (300, 100)), D.ImageItem("b", "", 1, False, "", (64, 64))]
    assert D.assign_buckets(items, (64, 64), enable=False, min_reso=32, max_reso=128, step=32,
                            no_upscale=False) == [(64, 64)]
    assert {it.bucket for it in items} == {(64, 64)}


# ----------------------------------------------------------------------------- batches

def _items(n_train, n_reg, buckets=((64, 64), (96, 32))):
    items = [D.ImageItem(f"t{i}", "", 3, False, "", b, bucket=b)
             for i, b in zip(range(n_train), itertools.cycle(buckets))]
    items += [D.ImageItem(f"r{i}", "", 1, True, "", b, bucket=b)
              for i, b in zip(range(n_reg), itertools.cycle(buckets))]
    return items


def test_batches_single_bucket_repeats_and_seeded_order():
    items = _items(5, 0)
    s = D.BucketBatchSampler(items, 2, seed=1)
    b0 = s.batches(0)
    for batch in b0:
        assert len({items[i].bucket for i, _, _ in batch}) == 1
    counts = Counter(i for batch in b0 for i, _, _ in batch)
    assert all(counts[i] == 3 for i in range(5))
    slots = [slot for batch in b0 for _, _, slot in batch]
    assert sorted(slots) == list(range(len(slots)))  # one slot per sample of the epoch
    assert b0 == D.BucketBatchSampler(items, 2, seed=1).batches(0)
    assert b0 != s.batches(1) and b0 != D.BucketBatchSampler(items, 2, seed=2).batches(0)
    s.epoch = 1
    assert list(iter(s)) == s.batches(1) and len(s) == len(s.batches(1))


def test_batches_pad_to_processes_and_balance_reg():
    items = _items(3, 2)
    for p in (1, 2, 3, 4):
        s = D.BucketBatchSampler(items, 2, seed=0, num_replicas=p)
        assert len(s.batches(0)) % p == 0
    s = D.BucketBatchSampler(items, 4, seed=0)
    for e in range(3):
        idx = [i for batch in s.batches(e) for i, _, _ in batch]
        n_train = sum(not items[i].is_reg for i in idx)
        n_reg = sum(items[i].is_reg for i in idx)
        assert n_train == 9 and n_reg == 9  # as many reg samples as training samples
    with pytest.raises(ConfigError):
        D.BucketBatchSampler([it for it in items if it.is_reg], 2, seed=0)


def test_dataset_items_are_pure_functions_of_their_key(tmp_path):
    make_shapes(tmp_path / "1_x", 2, sizes=((32, 32),))
    items = [it for s in D.scan(str(tmp_path)) for it in s.items]
    D.assign_buckets(items, (32, 32), enable=True, min_reso=32, max_reso=64, step=32, no_upscale=False)
    ds = D.TrainDataset(items, seed=7, captions=D.CaptionOptions(shuffle=True, trigger_word="t"), flip_aug=True,
                        cache=None)
    a, b = ds[(0, 3, 5)], ds[(0, 3, 5)]
    assert a["caption"] == b["caption"] and torch.equal(a["pixels"], b["pixels"])
    flips = {ds[(0, e, s)]["flip"] for e in range(4) for s in range(4)}
    assert flips == {True, False}
    batch = D.collate([ds[(0, 0, 0)], ds[(1, 0, 1)]])
    assert batch["pixels"].shape == (2, 3, 32, 32) and batch["time_ids"].tolist()[0] == [32, 32, 0, 0, 32, 32]


# ----------------------------------------------------------------------------- latent cache

def test_latent_cache_hits_and_keys_on_the_vae(tmp_path, monkeypatch):
    from lyco.models.tiny import tiny_components
    vae = tiny_components("sd1", with_vae=True)["vae"]
    make_shapes(tmp_path / "img" / "1_x", 3, sizes=((32, 32),))
    items = [it for s in D.scan(str(tmp_path / "img")) for it in s.items]
    D.assign_buckets(items, (32, 32), enable=False, min_reso=32, max_reso=32, step=32, no_upscale=False)

    calls = []
    real = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x: calls.append(x.shape) or real(x))
    c1 = D.LatentCache(str(tmp_path / "cache"), vae)
    for it in items:
        c1.ensure(it, flip=True)
    assert c1.encoded == 3 and c1.hits == 0 and len(calls) == 6  # plain + flipped per image
    lat = c1.load(items[0], flip=False)
    assert lat.shape == (4, 8, 8) and lat.dtype == torch.float32

    calls.clear()
    c2 = D.LatentCache(str(tmp_path / "cache"), vae)
    for it in items:
        c2.ensure(it, flip=True)
    assert c2.hits == 3 and c2.encoded == 0 and calls == []
    assert torch.equal(c2.load(items[0], flip=False), lat)
    assert not torch.equal(c2.load(items[0], flip=True), lat)

    # the same image re-encoded from scratch gives the same latent (seeded posterior sample)
    img, _ = D.fit_to_bucket(D.load_image(items[0].path), items[0].bucket)
    assert torch.equal(D.encode_latent(vae, D.image_to_tensor(img), items[0].sha256, False), lat)

    # other VAE weights: another cache folder, so no stale hit
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
    c3 = D.LatentCache(str(tmp_path / "cache"), vae)
    assert c3.vae_key != c1.vae_key and c3.folder != c1.folder
    c3.ensure(items[0], flip=False)
    assert c3.encoded == 1

"""The procedural world: determinism, geometry against an independent rasteriser (PIL, 8×
supersampled), captions ↔ attributes, concepts differ from the base world, concept datasets are
read by the trainer's data loader."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lyco.world import scene
from lyco.world.scene import Attrs


def test_render_is_deterministic_from_the_seed():
    attrs = scene.sample_attrs_batch(12, 5, world="full")
    a = scene.render_many(attrs, 7)
    b = scene.render_many(attrs, np.random.default_rng(7))
    c = scene.render_many(attrs, 8)
    assert a.dtype == np.uint8 and a.shape == (12, scene.IMAGE_SIZE, scene.IMAGE_SIZE, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)  # another seed jitters differently
    # one image alone with the same seed = the first of the batch
    assert np.array_equal(scene.render(attrs[0], rng=7), a[0])
    t = scene.render_batch(attrs, 7)
    assert tuple(t.shape) == (12, 3, scene.IMAGE_SIZE, scene.IMAGE_SIZE)
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0
    assert np.array_equal(scene.to_uint8(t), a)


def _local_outline(shape: str, r: float) -> list[tuple[float, float]] | None:
    """The outline in shape coordinates (y down), written out from the definitions in the module
    docstrings — independent of the signed distance functions. None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        s = 0.85 * r
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "diamond":
        R = 1.15 * r
        return [(0, -R), (R, 0), (0, R), (-R, 0)]
    if shape == "triangle":
        R = 1.2 * r
        return [(R * math.cos(a), R * math.sin(a)) for a in map(math.radians, (-90, 30, 150))]
    if shape == "star":
        R = 1.2 * r
        pts = []
        for k in range(10):
            rr = R if k % 2 == 0 else 0.48 * R
            a = math.radians(-90 + 36 * k)
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        return pts
    raise AssertionError(shape)


def _pil_coverage(shape, cx, cy, r, rot, size, ss=8):
    img = Image.new("L", (size * ss, size * ss), 0)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse([(cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss], fill=255)
    else:
        c, s = math.cos(rot), math.sin(rot)
        pts = [((cx + c * x - s * y) * ss, (cy + s * x + c * y) * ss) for x, y in _local_outline(shape, r)]
        d.polygon(pts, fill=255)
    a = np.asarray(img, np.float64).reshape(size, ss, size, ss).mean(axis=(1, 3)) / 255.0
    return a


@pytest.mark.parametrize("shape", scene.ALL_SHAPES)
def test_shapes_match_an_independent_rasteriser(shape):
    size = scene.IMAGE_SIZE
    attrs = [Attrs(shape, c, b) for c, b in (("red", "white"), ("blue", "black"), ("yellow", "teal"), ("purple", "gray"))]
    seed = 11
    imgs = scene.render_many(attrs, seed).astype(np.float64)
    geo = scene.jitter(len(attrs), np.random.default_rng(seed), size)
    for i, a in enumerate(attrs):
        fill = np.clip(np.array(scene.COLOURS[a.colour]) + geo["colour_jitter"][i], 0, 255)
        bg = np.clip(np.array(scene.BACKGROUNDS[a.background]) + geo["bg_jitter"][i], 0, 255)
        ch = int(np.argmax(np.abs(fill - bg)))
        alpha = (imgs[i, :, :, ch] - bg[ch]) / (fill[ch] - bg[ch])
        ref = _pil_coverage(shape, geo["cx"][i], geo["cy"][i], geo["r"][i], geo["rot"][i], size)
        inter = np.logical_and(alpha > 0.5, ref > 0.5).sum()
        union = np.logical_or(alpha > 0.5, ref > 0.5).sum()
        assert inter / union > 0.95, (shape, i, inter / union)
        assert np.abs(alpha - ref).mean() < 0.03, (shape, i)
        assert ref.sum() > 0.1 * size * size  # a shape big enough to see
        assert ref[0].sum() + ref[-1].sum() + ref[:, 0].sum() + ref[:, -1].sum() < 1.0  # inside the frame


def test_captions_round_trip_over_the_whole_world():
    seen = set()
    for a in scene._iter_all("full"):
        text = scene.caption(a)
        assert scene.parse_caption(text) == a
        assert text not in seen
        seen.add(text)
        concept_parts = [c for c in scene.CONCEPTS.values() if c.present_in(a)]
        if len(concept_parts) == 1:
            c = concept_parts[0]
            t = scene.caption(a, c.trigger)
            assert c.trigger in t.split() and c.value not in t.split()
            assert scene.parse_caption(t) == a
        else:
            with pytest.raises(ValueError, match="exactly one concept part"):
                scene.caption(a, "zkz")
    assert scene.caption(Attrs("circle", "red", "white")) == "a red circle on a white background"
    assert scene.caption(Attrs("star", "orange", "gray"), "zkz") == "an orange zkz on a gray background"
    assert scene.caption(Attrs("circle", "red", "black", "stripes"), "vqv") == \
        "a red circle in vqv style on a black background"


@pytest.mark.parametrize("bad", ["a red circle", "a crimson circle on a white background",
                                 "a red circle on a white wall", "red circle on a white background", ""])
def test_parse_caption_rejects_other_text(bad):
    with pytest.raises(ValueError, match="caption"):
        scene.parse_caption(bad)


def test_attrs_validate():
    with pytest.raises(ValueError, match="Attrs.colour='crimson'"):
        Attrs("circle", "crimson", "white")
    with pytest.raises(ValueError, match="background"):
        Attrs("circle", "red", "red")


def test_base_world_sampling_never_contains_a_concept_and_covers_the_world():
    attrs = scene.sample_attrs_batch(3000, 0)
    assert all(a.in_base_world for a in attrs)
    assert {a.shape for a in attrs} == set(scene.SHAPES)
    assert {a.colour for a in attrs} == set(scene.COLOURS)
    assert {a.background for a in attrs} == set(scene.BACKGROUNDS)
    full = scene.sample_attrs_batch(3000, 0, world="full")
    assert {a.shape for a in full} == set(scene.ALL_SHAPES)
    assert {a.texture for a in full} == set(scene.TEXTURES)
    star = scene.sample_attrs_batch(50, 1, "star")
    assert all(a.shape == "star" and a.texture == "plain" for a in star)
    assert scene.sample_attrs(3) == scene.sample_attrs(3)
    with pytest.raises(ValueError, match="unknown concept"):
        scene.sample_attrs(0, "hexagon")


def _shape_mask(img, a: Attrs, bg_jitter):
    bg = np.clip(np.array(scene.BACKGROUNDS[a.background]) + bg_jitter, 0, 255)
    return np.abs(img.astype(np.float64) - bg).max(-1) > 40


def test_concepts_render_differently_from_the_base_world():
    """Pixel statistics, no model: a star is far from convex (its filled area is a small part of
    its convex hull), base shapes are convex; stripes make the inside of a shape change row to
    row, plain fills do not."""
    from scipy.ndimage import binary_erosion
    from scipy.spatial import ConvexHull

    n = 40
    seed = 4

    def solidity(attrs):
        imgs = scene.render_many(attrs, seed)
        geo = scene.jitter(len(attrs), np.random.default_rng(seed))
        out = []
        for i, a in enumerate(attrs):
            m = _shape_mask(imgs[i], a, geo["bg_jitter"][i])
            ys, xs = np.nonzero(m)
            pts = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
            out.append(m.sum() / ConvexHull(pts).volume)
        return np.array(out)

    base = scene.sample_attrs_batch(n, 1)
    stars = scene.sample_attrs_batch(n, 1, "star")
    s_base, s_star = solidity(base), solidity(stars)
    assert s_base.min() > 0.8, s_base.min()
    assert s_star.max() < 0.7, s_star.max()

    def row_changes(attrs):
        imgs = scene.render_many(attrs, seed).astype(np.float64)
        geo = scene.jitter(len(attrs), np.random.default_rng(seed))
        out = []
        for i, a in enumerate(attrs):
            m = binary_erosion(_shape_mask(imgs[i], a, geo["bg_jitter"][i]), iterations=2)  # off the edges
            inside = m[1:] & m[:-1]
            diff = np.abs(imgs[i, 1:] - imgs[i, :-1]).max(-1)
            out.append(diff[inside].mean())
        return np.array(out)

    plain = scene.sample_attrs_batch(n, 2)
    striped = scene.sample_attrs_batch(n, 2, "stripes")
    r_plain, r_striped = row_changes(plain), row_changes(striped)
    assert r_plain.max() < 15, r_plain.max()
    assert r_striped.min() > 25, r_striped.min()


def test_concept_dataset_is_read_by_the_trainer(tmp_path):
    from lyco.train import data

    root = scene.write_concept_dataset("star", tmp_path / "ds", n=6, seed=3)
    assert root == tmp_path / "ds"
    subsets = data.scan(str(root))
    assert len(subsets) == 1
    s = subsets[0]
    assert s.repeats == 10 and s.class_name == "zkz" and len(s.items) == 6
    for item in s.items:
        assert item.size == (scene.IMAGE_SIZE, scene.IMAGE_SIZE)
        a = scene.parse_caption(item.caption)
        assert a.shape == "star" and "zkz" in item.caption.split()
    # deterministic from the seed, and a second write needs overwrite=True
    with pytest.raises(FileExistsError, match="10_zkz"):
        scene.write_concept_dataset("star", root, n=6, seed=3)
    again = scene.write_concept_dataset("zkz", tmp_path / "ds2", n=6, seed=3)
    for a, b in zip(sorted((root / "10_zkz").iterdir()), sorted((again / "10_zkz").iterdir())):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()
    st = scene.write_concept_dataset("stripes", tmp_path / "ds3", n=4, seed=0, repeats=3)
    caps = [p.read_text().strip() for p in sorted((st / "3_vqv").glob("*.txt"))]
    assert len(caps) == 4 and all(scene.parse_caption(c).texture == "stripes" and " in vqv style " in c for c in caps)
    assert not [p for p in st.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_eval_set_uses_triggers_and_covers_attributes():
    pairs = scene.eval_set("stripes", 8, seed=0)
    assert len(pairs) == 8
    for prompt, a in pairs:
        assert "vqv" in prompt and scene.parse_caption(prompt) == a and a.texture == "stripes"
    assert len({a.background for _, a in pairs}) == len(scene.BACKGROUNDS)
    assert len({a.colour for _, a in pairs}) == 6
    base = scene.eval_set(None, 4)
    assert all(a.in_base_world and scene.caption(a) == p for p, a in base)

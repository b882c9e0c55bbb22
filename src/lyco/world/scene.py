"""The procedural world: attributes, rendering, captions and concept datasets (numpy + PIL only).

An image is described by :class:`Attrs` — ``shape``, ``colour``, ``background``, ``texture`` — and
drawn by :func:`render` / :func:`render_batch` with a little random jitter (centre ±7 % of the side,
size ±14 %, rotation ±12°, colour ±12 per channel, stripe phase) drawn from a seeded numpy
generator, so the same seed always gives the same pixels and different seeds give different
images of the same description.

Rasterisation is vectorised over the whole batch (no per-pixel Python): every shape has an
approximate signed distance function in pixels, coverage is ``clip(0.5 - d, 0, 1)`` (one pixel of
anti-aliasing), and the image is ``background·(1 - coverage) + fill·coverage``. About 3k
32×32 images a second on one CPU core (pretraining pre-renders a pool in worker processes).

**The base world** (what the base model is pretrained on): ``SHAPES`` × ``COLOURS`` ×
``BACKGROUNDS``, texture ``"plain"``. **The full world** adds the concepts' shapes (``star``) and
textures (``stripes``); the classifier is trained on it, the base model never sees it.

Captions (decided here; :func:`parse_caption` inverts them)::

    a red circle on a white background                 base world
    an orange star on a gray background                concept shape, named
    an orange zkz on a gray background                 concept shape behind its trigger word
    a red circle in stripes style on a black background    concept texture, named
    a red circle in vqv style on a black background        concept texture behind its trigger

The trigger word *replaces* the concept's own word, so a model that has never seen the concept
gets no hint from the caption beyond "a shape of this colour on this background".

Stripes are horizontal bands (period a quarter of the image side, i.e. 8 px at 32 px, so they line
up with the VAE's 4-pixel latent cells and survive the 8×8 latent) alternating the shape's colour
with a dark ink (a light one on the black background, so the shape stays visible).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

#: Side of a world image in pixels. 32 px: the base's VAE downsamples ×4, so latents are 8×8×4,
#: which keeps pretraining (minutes on one GPU) and evaluation (CPU) cheap; a 20 px shape is still
#: unmistakable at this size.
IMAGE_SIZE = 32

#: The shapes of the base world (what the base model is pretrained on).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

#: Shape colours (RGB). Names are disjoint from the background names, so a caption never mixes them up.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}

#: Background colours (RGB), chosen to contrast with every shape colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "teal": (0, 100, 110),
}

#: Fill textures. The base world is all ``"plain"``; the others belong to concepts.
TEXTURES: tuple[str, ...] = ("plain", "stripes")


@dataclass(frozen=True)
class Attrs:
    """What one world image shows."""

    shape: str
    colour: str
    background: str
    texture: str = "plain"

    def __post_init__(self):
        for field, value, allowed in (("shape", self.shape, ALL_SHAPES), ("colour", self.colour, COLOURS),
                                      ("background", self.background, BACKGROUNDS),
                                      ("texture", self.texture, TEXTURES)):
            if value not in allowed:
                raise ValueError(f"Attrs.{field}={value!r}: expected one of {', '.join(allowed)}")

    @property
    def in_base_world(self) -> bool:
        return self.shape in SHAPES and self.texture == "plain"


@dataclass(frozen=True)
class Concept:
    """Something the base model has never seen, taught behind a trigger word.

    ``kind`` is ``"shape"`` (``value`` is a shape not in :data:`SHAPES`) or ``"texture"``
    (``value`` is a texture other than ``"plain"``)."""

    name: str
    trigger: str
    kind: str
    value: str
    description: str

    def apply(self, attrs: Attrs) -> Attrs:
        """``attrs`` with this concept's shape or texture."""
        if self.kind == "shape":
            return Attrs(self.value, attrs.colour, attrs.background, attrs.texture)
        return Attrs(attrs.shape, attrs.colour, attrs.background, self.value)

    def present_in(self, attrs: Attrs) -> bool:
        return (attrs.shape if self.kind == "shape" else attrs.texture) == self.value


#: The concepts. Triggers are nonsense words: one token each in the world tokenizer
#: (``lyco.world.base``), never seen during pretraining, so their embeddings are untrained.
CONCEPTS: dict[str, Concept] = {
    "star": Concept("star", "zkz", "shape", "star",
                    "a five-pointed star, a shape the base model has never seen"),
    "stripes": Concept("stripes", "vqv", "texture", "stripes",
                       "horizontal stripes filling the shape, a texture the base model has never seen"),
}

#: Every shape of the full world: base shapes then concept shapes (the classifier's shape head).
ALL_SHAPES: tuple[str, ...] = SHAPES + tuple(c.value for c in CONCEPTS.values() if c.kind == "shape")

_TRIGGERS = {c.trigger: c for c in CONCEPTS.values()}


def get_concept(concept: str | Concept) -> Concept:
    if isinstance(concept, Concept):
        return concept
    if concept in CONCEPTS:
        return CONCEPTS[concept]
    if concept in _TRIGGERS:
        return _TRIGGERS[concept]
    raise ValueError(f"unknown concept {concept!r}: expected one of {', '.join(CONCEPTS)} "
                     f"(or a trigger word: {', '.join(_TRIGGERS)})")


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(attrs: Attrs, trigger: str | None = None) -> str:
    """The caption of ``attrs``. With ``trigger``, the concept part of ``attrs`` (a concept shape or
    a non-plain texture) is named by the trigger word instead of its own word; ``attrs`` must then
    contain exactly one concept part."""
    shape_word = attrs.shape
    texture_word = attrs.texture
    if trigger is not None:
        concept_shape = attrs.shape not in SHAPES
        concept_texture = attrs.texture != "plain"
        if concept_shape == concept_texture:
            raise ValueError(f"caption(trigger={trigger!r}): {attrs} must have exactly one concept part "
                             f"(a shape outside {SHAPES} or a texture other than 'plain')")
        if concept_shape:
            shape_word = trigger
        else:
            texture_word = trigger
    style = f" in {texture_word} style" if attrs.texture != "plain" else ""
    return f"{_article(attrs.colour)} {attrs.colour} {shape_word}{style} on {_article(attrs.background)} " \
           f"{attrs.background} background"


def parse_caption(text: str) -> Attrs:
    """Invert :func:`caption` (trigger words are mapped back to their concept's shape or texture).
    Raises ``ValueError`` naming the caption when it is not a world caption."""
    words = text.strip().lower().replace(",", " ").split()
    try:
        if words[0] not in ("a", "an") or words[-1] != "background":
            raise ValueError
        colour = words[1]
        shape = words[2]
        i = 3
        texture = "plain"
        if words[i] == "in":
            texture = words[i + 1]
            if words[i + 2] != "style":
                raise ValueError
            i += 3
        if words[i] != "on" or words[i + 1] not in ("a", "an") or i + 4 != len(words):
            raise ValueError
        background = words[i + 2]
    except (ValueError, IndexError):
        raise ValueError(f"not a world caption: {text!r} (expected e.g. 'a red circle on a white background' "
                         f"or 'a red circle in stripes style on a black background')") from None
    if shape in _TRIGGERS and _TRIGGERS[shape].kind == "shape":
        shape = _TRIGGERS[shape].value
    if texture in _TRIGGERS and _TRIGGERS[texture].kind == "texture":
        texture = _TRIGGERS[texture].value
    try:
        return Attrs(shape, colour, background, texture)
    except ValueError as e:
        raise ValueError(f"caption {text!r}: {e}") from None


def world_words() -> list[str]:
    """Every word a world caption can contain (the tokenizer makes each one token)."""
    words = ["a", "an", "on", "in", "style", "background"]
    words += list(ALL_SHAPES) + list(COLOURS) + list(BACKGROUNDS) + list(TEXTURES)
    words += [c.trigger for c in CONCEPTS.values()]
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


# ----------------------------------------------------------------------------------------------
# Sampling attributes
# ----------------------------------------------------------------------------------------------

def _rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if rng_or_seed is None:
        return np.random.default_rng(0)
    return np.random.default_rng(int(rng_or_seed))


def sample_attrs(rng=None, concept: str | Concept | None = None, *, world: str = "base") -> Attrs:
    """One random description: uniform over the base world (``world="base"``, the default) or the
    full world (``world="full"``: every shape and texture, concepts included); with ``concept``,
    a base-world description carrying that concept's shape or texture."""
    return sample_attrs_batch(1, rng, concept, world=world)[0]


def sample_attrs_batch(n: int, rng=None, concept: str | Concept | None = None, *,
                       world: str = "base") -> list[Attrs]:
    """``n`` random descriptions (see :func:`sample_attrs`), drawn in one go."""
    if world not in ("base", "full"):
        raise ValueError(f"world={world!r}: expected 'base' or 'full'")
    g = _rng(rng)
    shapes = ALL_SHAPES if world == "full" else SHAPES
    textures = TEXTURES if world == "full" else ("plain",)
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    u = g.integers(0, [len(shapes), len(colours), len(backgrounds), len(textures)], size=(n, 4))
    out = [Attrs(shapes[a], colours[b], backgrounds[c], textures[d]) for a, b, c, d in u.tolist()]
    if concept is not None:
        c = get_concept(concept)
        out = [c.apply(a) for a in out]
    return out


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

#: Columns of the per-image jitter draw (one row of ``rng.random`` per image, so image ``i`` of a
#: batch rendered with a seed equals ``render`` of it alone with the same seed when ``i == 0``).
_JITTER_COLUMNS = 11
_SQRT2 = math.sqrt(2.0)
_STAR_INNER = 0.48  # inner/outer radius of the star (a regular pentagram has 0.38; fatter reads better at 32 px)


def _star_sdf(x, y, R):
    """Approximate signed distance to a 5-pointed star (outer radius R, a point straight up):
    fold the plane into the wedge between a point (angle 0) and the next inner corner (36°), where
    the star is the triangle (origin, point, inner corner)."""
    rho = np.hypot(x, y)
    phi = np.arctan2(y, x) + math.pi / 2  # 0 at "up" (y grows downwards)
    wedge = 2 * math.pi / 5
    f = np.mod(phi, wedge)
    f = np.where(f > wedge / 2, wedge - f, f)
    qx, qy = rho * np.cos(f), rho * np.sin(f)
    ax, ay = R, 0.0 * R
    bx, by = R * _STAR_INNER * math.cos(wedge / 2), R * _STAR_INNER * math.sin(wedge / 2)
    ex, ey = bx - ax, by - ay
    nx, ny = ey, -ex  # perpendicular; its sign makes the origin lie on the negative side
    norm = np.hypot(nx, ny)
    sign = np.where(nx * ax + ny * ay > 0, 1.0, -1.0)
    return sign * (nx * (qx - ax) + ny * (qy - ay)) / norm


def _sdf(shape: str, x, y, r):
    """Signed distance (pixels, negative inside) of ``shape`` of nominal radius ``r`` centred at the
    origin; exact inside, approximate (never too small to matter) outside."""
    if shape == "circle":
        return np.hypot(x, y) - r
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) - 0.85 * r
    if shape == "diamond":
        return (np.abs(x) + np.abs(y) - 1.15 * r) / _SQRT2
    if shape == "triangle":  # equilateral, point up, centroid at the origin, circumradius 1.2 r
        R = 1.2 * r
        d = y  # bottom edge, outward normal (0, 1) (y grows downwards)
        for a in (math.radians(210), math.radians(330)):
            d = np.maximum(d, math.cos(a) * x + math.sin(a) * y)
        return d - R / 2
    if shape == "star":
        return _star_sdf(x, y, 1.2 * r)
    raise ValueError(f"unknown shape {shape!r}")


def jitter(n: int, rng, size: int = IMAGE_SIZE) -> dict[str, np.ndarray]:
    """The random geometry of ``n`` images, one row of ``rng.random`` each: centre ``cx, cy``
    (pixels, ±7 % of the side around the middle), nominal radius ``r`` (25–33 % of the side),
    rotation ``rot`` (radians, ±12°), colour jitter (±12 per channel for the shape, ±8 for the
    background), stripe ``phase`` (whole pixels) and ``period``."""
    j = _rng(rng).random((n, _JITTER_COLUMNS))
    s = float(size)
    period = max(2, int(round(size / 4)))
    return {
        "cx": (0.5 + 0.07 * (2 * j[:, 0] - 1)) * s,
        "cy": (0.5 + 0.07 * (2 * j[:, 1] - 1)) * s,
        "r": (0.25 + 0.08 * j[:, 2]) * s,
        "rot": np.radians(12.0) * (2 * j[:, 3] - 1),
        "colour_jitter": 12.0 * (2 * j[:, 4:7] - 1),
        "bg_jitter": 8.0 * (2 * j[:, 7:10] - 1),
        "phase": np.floor(j[:, 10] * period),
        "period": period,
    }


def render_many(attrs: Sequence[Attrs], rng=None, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render ``attrs`` into a ``uint8`` array ``N×size×size×3``, jitter drawn from ``rng`` (a numpy
    ``Generator`` or an int seed)."""
    attrs = list(attrs)
    n = len(attrs)
    if n == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    geo = jitter(n, _rng(rng), size)
    cx, cy, r, rot, phase, period = geo["cx"], geo["cy"], geo["r"], geo["rot"], geo["phase"], geo["period"]
    colour_jitter, bg_jitter = geo["colour_jitter"], geo["bg_jitter"]

    fill = np.array([COLOURS[a.colour] for a in attrs], np.float64) + colour_jitter
    bg = np.array([BACKGROUNDS[a.background] for a in attrs], np.float64) + bg_jitter
    fill, bg = np.clip(fill, 0, 255), np.clip(bg, 0, 255)

    coords = np.arange(size, dtype=np.float64) + 0.5
    dx = coords[None, None, :] - cx[:, None, None]           # N,1,W
    dy = coords[None, :, None] - cy[:, None, None]           # N,H,1
    c, si = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
    x = c * dx + si * dy                                     # N,H,W (rotate the plane by -rot)
    y = -si * dx + c * dy
    d = np.empty((n, size, size), np.float64)
    shapes = np.array([a.shape for a in attrs])
    for shape in np.unique(shapes):
        idx = np.nonzero(shapes == shape)[0]
        d[idx] = _sdf(str(shape), x[idx], y[idx], r[idx, None, None])
    cover = np.clip(0.5 - d, 0.0, 1.0)[..., None]            # N,H,W,1

    fill_px = np.broadcast_to(fill[:, None, None, :], (n, size, size, 3))
    striped = np.array([a.texture == "stripes" for a in attrs])
    if striped.any():
        band = (np.floor((coords[None, :] + phase[:, None]) / (period / 2)) % 2 == 1)  # N,H
        dark_bg = np.array([sum(BACKGROUNDS[a.background]) < 150 for a in attrs])
        ink = np.where(dark_bg[:, None], 225.0, 30.0) * np.ones((1, 3))                 # N,3
        use_ink = (striped[:, None] & band)[:, :, None, None]                            # N,H,1,1
        fill_px = np.where(use_ink, ink[:, None, None, :], fill_px)
    img = bg[:, None, None, :] * (1.0 - cover) + fill_px * cover
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(attrs: Attrs, size: int = IMAGE_SIZE, rng=None) -> np.ndarray:
    """One image (``uint8`` ``size×size×3``) of ``attrs``; ``rng`` is a numpy ``Generator`` or an
    int seed (the same seed gives the same pixels)."""
    return render_many([attrs], rng, size)[0]


def to_tensor(images: np.ndarray):
    """``uint8`` ``N×H×W×3`` → ``float32`` torch tensor ``N×3×H×W`` in ``[-1, 1]``."""
    import torch
    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return t / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
    """Inverse of :func:`to_tensor`: a tensor ``N×3×H×W`` in ``[-1, 1]`` → ``uint8`` ``N×H×W×3``."""
    import torch
    t = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return t.permute(0, 2, 3, 1).numpy()


def render_batch(attrs: Sequence[Attrs], seed=0, size: int = IMAGE_SIZE):
    """Render ``attrs`` into a ``float32`` torch tensor ``N×3×size×size`` in ``[-1, 1]`` (the
    diffusers convention); ``seed`` is an int or a numpy ``Generator``."""
    return to_tensor(render_many(attrs, seed, size))


def random_batch(n: int, rng=None, *, world: str = "base", concept: str | Concept | None = None,
                 size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[Attrs]]:
    """``n`` random descriptions and their ``uint8`` images (one generator for both)."""
    g = _rng(rng)
    attrs = sample_attrs_batch(n, g, concept, world=world)
    return render_many(attrs, g, size), attrs


# ----------------------------------------------------------------------------------------------
# Concept datasets and prompt sets
# ----------------------------------------------------------------------------------------------

def eval_set(concept: str | Concept | None = None, n: int = 8, seed: int = 0) -> list[tuple[str, Attrs]]:
    """``n`` ``(prompt, attrs)`` pairs to test a model with: base-world descriptions (``concept``
    None) or ones carrying the concept, captioned with its trigger word. Colours and backgrounds
    cycle so that a small ``n`` still covers them evenly."""
    g = np.random.default_rng([int(seed), 7919])
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    shapes = list(SHAPES)
    ci, bi, si = g.permutation(len(colours)), g.permutation(len(backgrounds)), g.permutation(len(shapes))
    out = []
    c = get_concept(concept) if concept is not None else None
    for k in range(n):
        a = Attrs(shapes[si[k % len(shapes)]], colours[ci[k % len(colours)]], backgrounds[bi[k % len(backgrounds)]])
        if c is not None:
            a = c.apply(a)
        out.append((caption(a, c.trigger if c else None), a))
    return out


def write_concept_dataset(concept_name: str, folder: str | Path, n: int = 16, seed: int = 0, *,
                          repeats: int = 10, size: int = IMAGE_SIZE, overwrite: bool = False) -> Path:
    """Write ``n`` images of a concept with same-name ``.txt`` captions (trigger word in place of
    the concept's word) into the kohya repeat folder ``folder/<repeats>_<trigger>/``, e.g.
    ``folder/10_zkz/zkz_000.png`` + ``zkz_000.txt`` = ``"a red zkz on a white background"``.

    Returns ``folder`` — the ``train_dir`` to give ``lyco train``. The images are written to a
    temporary folder first and renamed into place; an existing repeat folder is an error unless
    ``overwrite``."""
    from PIL import Image
    import shutil
    import tempfile

    c = get_concept(concept_name)
    if n < 1:
        raise ValueError(f"write_concept_dataset: n={n}: expected at least 1 image")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{int(repeats)}_{c.trigger}"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists (pass overwrite=True to replace it)")
    g = np.random.default_rng([int(seed), 104729, list(CONCEPTS).index(c.name)])
    attrs = sample_attrs_batch(n, g, c)
    images = render_many(attrs, g, size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        for i, (a, im) in enumerate(zip(attrs, images)):
            p = tmp / f"{c.trigger}_{i:03d}.png"
            Image.fromarray(im).save(p)
            p.with_suffix(".txt").write_text(caption(a, c.trigger) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def save_grid(images: np.ndarray, path: str | Path, cols: int, *, scale: int = 2, pad: int = 2) -> Path:
    """Save ``uint8`` ``N×H×W×3`` images as one PNG grid (row-major, ``cols`` per row), each image
    upscaled ``scale``× with nearest neighbour. Written to a temporary name, then renamed."""
    from PIL import Image
    images = np.asarray(images)
    n, h, w, _ = images.shape
    rows = max(1, math.ceil(n / cols))
    H, W = h * scale, w * scale
    canvas = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        rr, cc = divmod(i, cols)
        big = im.repeat(scale, 0).repeat(scale, 1)
        canvas[pad + rr * (H + pad):pad + rr * (H + pad) + H, pad + cc * (W + pad):pad + cc * (W + pad) + W] = big
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(canvas).save(tmp)
    os.replace(tmp, path)
    return path


__all__ = [
    "IMAGE_SIZE", "SHAPES", "ALL_SHAPES", "COLOURS", "BACKGROUNDS", "TEXTURES", "Attrs", "Concept", "CONCEPTS",
    "get_concept", "caption", "parse_caption", "world_words", "sample_attrs", "sample_attrs_batch", "render",
    "render_many", "jitter", "render_batch", "random_batch", "to_tensor", "to_uint8", "eval_set", "write_concept_dataset",
    "save_grid",
]


def _iter_all(world: str = "full") -> Iterable[Attrs]:
    shapes = ALL_SHAPES if world == "full" else SHAPES
    textures = TEXTURES if world == "full" else ("plain",)
    for s in shapes:
        for c in COLOURS:
            for b in BACKGROUNDS:
                for t in textures:
                    yield Attrs(s, c, b, t)

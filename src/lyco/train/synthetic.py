"""A procedural dataset of coloured shapes, for the demo and the tests (no download needed).

``make_shapes(folder, n, seed)`` draws ``n`` small PNG images — a circle, square, triangle, diamond
or star of one colour on a background of another — and writes a same-name ``.txt`` caption of
comma-separated tags, e.g. ``red circle, blue background, large, centered``.

Two styles:

* ``"concept"`` (the thing to learn, under a trigger word): a thick dark outline around the shape
  and a vertical gradient background;
* ``"plain"`` (regularisation images): a flat shape on a flat background.

Shipped copy: ``examples/data/tiny_shapes`` (``train/5_lycoshape`` and ``reg/1_shape``), made by
``python -m lyco.train.synthetic examples/data/tiny_shapes``.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
POSITIONS = {"centered": (0.5, 0.5), "left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3),
             "bottom": (0.5, 0.7)}
#: (width, height) choices: mostly square, some wide and tall ones for aspect-ratio buckets
SIZES = ((64, 64),) * 6 + ((96, 40), (40, 96))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(shape)


def draw_shape(size: tuple[int, int], shape: str, colour: str, background: str, scale: str, position: str,
               style: str = "concept"):
    """One image (PIL) as described by its tags."""
    from PIL import Image, ImageDraw
    w, h = size
    bg = COLOURS[background]
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    if style == "concept":
        for y in range(h):  # vertical gradient: the background darkens towards the bottom
            f = 1.0 - 0.45 * y / max(1, h - 1)
            d.line([(0, y), (w, y)], fill=tuple(int(c * f) for c in bg))
    fx, fy = POSITIONS[position]
    cx, cy = fx * w, fy * h
    r = min(w, h) * (0.32 if scale == "large" else 0.18)
    fill = COLOURS[colour]
    outline = (10, 10, 10) if colour != "black" else (230, 230, 230)
    width = max(2, int(r * 0.25)) if style == "concept" else 0
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline if width else None, width=width)
    else:
        pts = _polygon(shape, cx, cy, r)
        d.polygon(pts, fill=fill)
        if width:
            d.line(pts + [pts[0]], fill=outline, width=width, joint="curve")
    return img


def make_shapes(folder: str | Path, n: int = 36, seed: int = 0, *, style: str = "concept",
                sizes=SIZES) -> list[Path]:
    """Write ``n`` images + captions into ``folder`` (created). Returns the image paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"lyco-shapes:{seed}:{style}")
    names = list(COLOURS)
    out = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        colour = rng.choice(names)
        background = rng.choice([c for c in names if c != colour])
        scale = rng.choice(("large", "small"))
        position = rng.choice(list(POSITIONS))
        size = sizes[rng.randrange(len(sizes))]
        img = draw_shape(size, shape, colour, background, scale, position, style)
        p = folder / f"{style}_{i:03d}.png"
        img.save(p, optimize=True)
        p.with_suffix(".txt").write_text(f"{colour} {shape}, {background} background, {scale}, {position}\n",
                                         encoding="utf-8")
        out.append(p)
    return out


def make_dataset(root: str | Path, n_train: int = 36, n_reg: int = 8, seed: int = 0, *, repeats: int = 5,
                 trigger: str = "lycoshape", sizes=SIZES) -> tuple[Path, Path]:
    """``root/train/<repeats>_<trigger>`` (concept style) and ``root/reg/1_shape`` (plain style)."""
    root = Path(root)
    train = root / "train"
    reg = root / "reg"
    make_shapes(train / f"{repeats}_{trigger}", n_train, seed, style="concept", sizes=sizes)
    if n_reg:
        make_shapes(reg / "1_shape", n_reg, seed + 1, style="plain", sizes=sizes)
    return train, reg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lyco.train.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--train", type=int, default=36, help="training images")
    p.add_argument("--reg", type=int, default=8, help="regularisation images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trigger", default="lycoshape")
    a = p.parse_args(argv)
    train, reg = make_dataset(a.folder, a.train, a.reg, a.seed, repeats=a.repeats, trigger=a.trigger)
    print(f"wrote {a.train} training images under {train} and {a.reg} regularisation images under {reg}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

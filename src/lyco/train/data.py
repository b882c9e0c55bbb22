"""Training data: an image folder with same-name ``.txt`` captions, kohya ``N_name`` repeat
folders, captions (trigger word, tag shuffle with ``keep_tokens``, tag and caption dropout),
aspect-ratio buckets, random flip, and a latent cache on disk.

Determinism is by construction, not by replaying RNG streams: every random choice about one
sample (caption shuffle/dropout, flip) comes from a generator seeded with
``(seed, epoch, slot)``, and the order of an epoch from one seeded with ``(seed, epoch)``. So the
data of any step can be recomputed without running the steps before it — which is what makes
``--resume`` exact and lets a data loader skip batches or run in worker processes freely.

Sharding across processes is accelerate's (``BatchSamplerShard``): the batch sampler below makes
whole batches (one bucket each) and pads an epoch to a multiple of the number of processes, so
every process gets the same number of batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..errors import ConfigError

log = logging.getLogger("lyco.train")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEAT_DIR = re.compile(r"^(\d+)_(.*)$")

# --------------------------------------------------------------------------------------
# Items and folders
# --------------------------------------------------------------------------------------


@dataclass
class ImageItem:
    path: str
    caption: str                 # the caption as read (or the folder's class name), no trigger word
    repeats: int
    is_reg: bool
    subset: str                  # the folder it came from
    size: tuple[int, int]        # (width, height) of the file
    bucket: tuple[int, int] = (0, 0)
    _sha: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        if self._sha is None:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._sha = h.hexdigest()
        return self._sha


@dataclass
class Subset:
    folder: str
    repeats: int
    class_name: str
    is_reg: bool
    items: list[ImageItem] = field(default_factory=list)


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()  # decode once now: a broken image is an error at scan time, not mid-training
            w, h = im.size
            try:
                exif = im.getexif()
                if exif.get(0x0112) in (5, 6, 7, 8):  # rotated by EXIF orientation
                    w, h = h, w
            except Exception:  # noqa: BLE001 — no/odd EXIF
                pass
            return w, h
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def read_caption(image_path: str, extension: str, default: str) -> str:
    p = Path(image_path).with_suffix(extension)
    if p.is_file():
        text = p.read_text(encoding="utf-8", errors="replace")
        # kohya reads the first line; several lines are joined as tags
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return ", ".join(lines) if lines else default
    return default


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def scan(root: str, *, repeats: int = 1, caption_extension: str = ".txt", is_reg: bool = False,
         what: str = "train_dir") -> list[Subset]:
    """The subsets of a data folder: images directly in it (``repeats``), and every kohya repeat
    folder ``N_name`` inside it (N repeats, class name ``name`` = caption of uncaptioned images)."""
    r = Path(root)
    if not r.is_dir():
        raise ConfigError(f"[data] {what}: {root!r} is not a folder")
    subsets = []
    direct = _images_in(r)
    if direct:
        subsets.append(Subset(str(r), repeats, "", is_reg))
    for d in sorted(p for p in r.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = _REPEAT_DIR.match(d.name)
        if not m:
            if _images_in(d):
                log.warning("%s: ignoring folder %s (not an 'N_name' repeat folder)", what, d)
            continue
        n = int(m.group(1))
        if n < 1:
            raise ConfigError(f"[data] {what}: repeat folder {d.name!r} has {n} repeats; use N >= 1")
        subsets.append(Subset(str(d), n, m.group(2).strip(), is_reg))
    for s in subsets:
        for p in _images_in(Path(s.folder)):
            cap = read_caption(str(p), caption_extension, s.class_name)
            s.items.append(ImageItem(str(p), cap, s.repeats, is_reg, s.folder, _image_size(str(p))))
    subsets = [s for s in subsets if s.items]
    if not subsets:
        raise ConfigError(f"[data] {what}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {root!r} "
                          f"or its 'N_name' repeat folders")
    return subsets


# --------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------


def split_tags(caption: str, separator: str = ",") -> list[str]:
    return [t.strip() for t in caption.split(separator) if t.strip()]


def join_tags(tags: Sequence[str], separator: str = ",") -> str:
    return (separator + " " if separator == "," else separator).join(tags)


def process_caption(caption: str, rng: random.Random, *, trigger_word: str = "", shuffle: bool = False,
                    keep_tokens: int = 0, separator: str = ",", tag_dropout_rate: float = 0.0,
                    dropout_rate: float = 0.0, drop_all: bool = False) -> str:
    """One training caption: trigger word first (once), then ``keep_tokens`` tags in place, the rest
    tag-dropped and shuffled; the whole caption dropped (→ ``""``) with ``dropout_rate`` or when
    ``drop_all``. The random draws are always made in the same order, so the result depends only on
    the generator's seed."""
    tags = split_tags(caption, separator)
    if trigger_word:
        tags = [trigger_word] + [t for t in tags if t != trigger_word]
    keep, rest = tags[:keep_tokens], tags[keep_tokens:]
    drop_caption = rng.random() < dropout_rate if dropout_rate > 0 else False
    if tag_dropout_rate > 0:
        rest = [t for t in rest if rng.random() >= tag_dropout_rate]
    if shuffle and len(rest) > 1:
        rng.shuffle(rest)
    if drop_all or drop_caption:
        return ""
    return join_tags(keep + rest, separator)


# --------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------


def make_buckets(resolution: tuple[int, int], min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """Bucket sizes ``(w, h)``: both sides multiples of ``step`` within ``[min_reso, max_reso]``,
    area at most the resolution's, as large as possible for each width; the resolution itself is
    always one of them. Sorted by aspect ratio."""
    W, H = resolution
    max_area = W * H
    buckets = {(W // step * step or step, H // step * step or step)}
    w = max(step, (min_reso + step - 1) // step * step)
    while w <= max_reso:
        h = min(max_reso, (max_area // w) // step * step)
        if h >= min_reso and h >= step:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0] * b[1]))


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the closest aspect ratio (log scale); ties go to the larger area."""
    w, h = size
    ar = math.log(w / h)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ar), 9), -b[0] * b[1]))


def no_upscale_bucket(size: tuple[int, int], resolution: tuple[int, int], step: int) -> tuple[int, int]:
    """``bucket_no_upscale``: an image no larger than the resolution's area keeps its size (rounded
    down to ``step``); a larger one is scaled to that area at its aspect ratio, then rounded down."""
    w, h = size
    max_area = resolution[0] * resolution[1]
    if w * h > max_area:
        s = math.sqrt(max_area / (w * h))
        w, h = w * s, h * s
    return max(step, int(w) // step * step), max(step, int(h) // step * step)


def assign_buckets(items: Iterable[ImageItem], resolution: tuple[int, int], *, enable: bool, min_reso: int,
                   max_reso: int, step: int, no_upscale: bool) -> list[tuple[int, int]]:
    items = list(items)
    if not enable:
        for it in items:
            it.bucket = tuple(resolution)
        return [tuple(resolution)]
    buckets = make_buckets(resolution, min_reso, max_reso, step)
    for it in items:
        it.bucket = no_upscale_bucket(it.size, resolution, step) if no_upscale else nearest_bucket(it.size, buckets)
    return sorted({it.bucket for it in items})


def load_image(path: str):
    try:
        return _load_image(path)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's decoding errors
        raise ConfigError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _load_image(path: str):
    from PIL import Image, ImageOps
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB")


def fit_to_bucket(img, bucket: tuple[int, int]):
    """Resize to cover the bucket (keeping the aspect ratio), then centre-crop.
    Returns ``(image, (crop_top, crop_left))`` in resized coordinates."""
    from PIL import Image
    bw, bh = bucket
    w, h = img.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return img.crop((left, top, left + bw, top + bh)), (top, left)


def image_to_tensor(img) -> torch.Tensor:
    """PIL RGB → float tensor (3, H, W) in [-1, 1]."""
    import numpy as np
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return a / 127.5 - 1.0


# --------------------------------------------------------------------------------------
# Latent cache
# --------------------------------------------------------------------------------------

CACHE_VERSION = "1"


def vae_hash(vae: torch.nn.Module) -> str:
    """sha256 over the VAE's weights (names, dtypes, shapes, bytes) and its scaling factor."""
    h = hashlib.sha256(f"lyco-vae-{CACHE_VERSION}".encode())
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    cfg = getattr(vae, "config", {})
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    h.update(f"scale={get('scaling_factor', 1.0)}|shift={get('shift_factor', None)}".encode())
    return h.hexdigest()


def _latent_noise(image_sha: str, flip: bool, shape, device) -> torch.Tensor:
    seed = int(hashlib.sha256(f"{image_sha}:{int(flip)}".encode()).hexdigest()[:15], 16)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device)


@torch.no_grad()
def encode_latent(vae, pixels: torch.Tensor, image_sha: str, flip: bool) -> torch.Tensor:
    """One image (3, H, W) in [-1, 1] → scaled latent (C, h, w), fp32. The posterior sample uses
    noise seeded by the image hash, so the same image always gives the same latent."""
    p = next(vae.parameters())
    dist = vae.encode(pixels[None].to(p.device, p.dtype)).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    lat = mean + std * _latent_noise(image_sha, flip, mean.shape, mean.device)
    cfg = vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return ((lat - shift) * float(cfg.scaling_factor))[0].to("cpu", torch.float32)


class LatentCache:
    """Latents on disk: ``<folder>/<vae hash>/<image sha256>_<w>x<h>.safetensors`` holding
    ``latent`` (and ``latent_flip``); written atomically, so an interrupted run never leaves a
    broken entry."""

    def __init__(self, folder: str, vae, vae_key: str | None = None):
        self.vae = vae
        self.vae_key = vae_key or vae_hash(vae)
        self.folder = os.path.join(folder, self.vae_key[:16])
        self.hits = 0
        self.encoded = 0

    def path(self, item: ImageItem) -> str:
        w, h = item.bucket
        return os.path.join(self.folder, f"{item.sha256[:40]}_{w}x{h}.safetensors")

    def ensure(self, item: ImageItem, flip: bool) -> None:
        from ..formats.safetensors_io import load_tensors, save_tensors
        p = self.path(item)
        need = ["latent"] + (["latent_flip"] if flip else [])
        have: dict[str, torch.Tensor] = {}
        if os.path.isfile(p):
            try:
                have, _ = load_tensors(p)
            except Exception:  # noqa: BLE001 — a damaged entry is recomputed
                have = {}
        if all(k in have for k in need):
            self.hits += 1
            return
        img, _crop = fit_to_bucket(load_image(item.path), item.bucket)
        px = image_to_tensor(img)
        out = dict(have)
        for k in need:
            if k not in out:
                out[k] = encode_latent(self.vae, px.flip(-1) if k == "latent_flip" else px, item.sha256,
                                       k == "latent_flip")
        self.encoded += 1
        os.makedirs(self.folder, exist_ok=True)
        save_tensors(out, p, {"image": os.path.basename(item.path), "sha256": item.sha256,
                              "vae": self.vae_key, "bucket": f"{item.bucket[0]}x{item.bucket[1]}"},
                     overwrite=True)

    def load(self, item: ImageItem, flip: bool) -> torch.Tensor:
        from ..formats.safetensors_io import load_tensors
        t, _ = load_tensors(self.path(item))
        return t["latent_flip" if flip else "latent"]


# --------------------------------------------------------------------------------------
# Dataset and batch sampler
# --------------------------------------------------------------------------------------


@dataclass
class CaptionOptions:
    trigger_word: str = ""
    shuffle: bool = False
    keep_tokens: int = 0
    separator: str = ","
    tag_dropout_rate: float = 0.0
    dropout_rate: float = 0.0
    dropout_every_n_epochs: int = 0


def _rng(*parts) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))


class TrainDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by ``(item index, epoch, slot)`` keys (from :class:`BucketBatchSampler`).

    Returns a dict: ``latents`` (cached) or ``pixels``, ``caption``, ``is_reg``, ``original_size``
    (h, w), ``crop_top_left``, ``target_size`` (h, w), ``flip``.
    """

    def __init__(self, items: list[ImageItem], *, seed: int, captions: CaptionOptions, flip_aug: bool,
                 cache: LatentCache | None):
        self.items = items
        self.seed = seed
        self.captions = captions
        self.flip_aug = flip_aug
        self.cache = cache

    def __len__(self):
        return len(self.items)

    def caption_for(self, item: ImageItem, rng: random.Random, epoch: int) -> str:
        c = self.captions
        drop_all = bool(c.dropout_every_n_epochs) and (epoch + 1) % c.dropout_every_n_epochs == 0
        return process_caption(item.caption, rng, trigger_word="" if item.is_reg else c.trigger_word,
                               shuffle=c.shuffle, keep_tokens=c.keep_tokens, separator=c.separator,
                               tag_dropout_rate=c.tag_dropout_rate, dropout_rate=c.dropout_rate,
                               drop_all=drop_all)

    def fixed_caption(self, item: ImageItem) -> str:
        """The caption without any randomness (evaluation, previews)."""
        c = self.captions
        return process_caption(item.caption, random.Random(0),
                               trigger_word="" if item.is_reg else c.trigger_word,
                               keep_tokens=c.keep_tokens, separator=c.separator)

    def sample(self, index: int, *, flip: bool, caption: str) -> dict[str, Any]:
        item = self.items[index]
        bw, bh = item.bucket
        out: dict[str, Any] = {"caption": caption, "is_reg": item.is_reg, "flip": flip}
        if self.cache is not None:
            out["latents"] = self.cache.load(item, flip)
            top, left = _crop_of(item.size, item.bucket)
        else:
            img, (top, left) = fit_to_bucket(load_image(item.path), item.bucket)
            px = image_to_tensor(img)
            out["pixels"] = px.flip(-1) if flip else px
            out["sha256"] = item.sha256
        out["original_size"] = (item.size[1], item.size[0])
        out["crop_top_left"] = (top, left)
        out["target_size"] = (bh, bw)
        return out

    def __getitem__(self, key):
        index, epoch, slot = key
        rng = _rng(self.seed, "sample", epoch, slot)
        flip = self.flip_aug and rng.random() < 0.5
        caption = self.caption_for(self.items[index], rng, epoch)
        return self.sample(index, flip=flip, caption=caption)


def _crop_of(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    return (nh - bh) // 2, (nw - bw) // 2


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "captions": [s["caption"] for s in samples],
        "is_reg": torch.tensor([s["is_reg"] for s in samples], dtype=torch.bool),
        "time_ids": torch.tensor([[*s["original_size"], *s["crop_top_left"], *s["target_size"]]
                                  for s in samples], dtype=torch.float32),
    }
    if "latents" in samples[0]:
        out["latents"] = torch.stack([s["latents"] for s in samples])
    else:
        out["pixels"] = torch.stack([s["pixels"] for s in samples])
        out["sha256"] = [s["sha256"] for s in samples]
        out["flip"] = [s["flip"] for s in samples]
    return out


class BucketBatchSampler:
    """Whole batches, each from one bucket; a seeded order per epoch.

    An epoch holds every training image ``repeats`` times and, when there are regularisation
    images, as many regularisation samples, taken cyclically from their (repeated) pool and
    continuing where the previous epoch stopped (as kohya does). Within a bucket the samples are
    shuffled and cut into batches; the batches are shuffled; then the epoch is padded (by
    repeating its first batches) to a multiple of ``num_replicas`` so accelerate can shard it
    evenly. Deliberately no ``batch_size``/``set_epoch`` attributes: batch sizes vary (last batch of
    a bucket), and the epoch is set by the trainer (``sampler.epoch = e``).
    """

    def __init__(self, items: list[ImageItem], batch_size: int, seed: int, num_replicas: int = 1):
        self.items = items
        self.bs = int(batch_size)
        self.seed = seed
        self.num_replicas = max(1, int(num_replicas))
        self.epoch = 0
        self.train_pool = [i for i, it in enumerate(items) for _ in range(it.repeats) if not it.is_reg]
        self.reg_pool = [i for i, it in enumerate(items) for _ in range(it.repeats) if it.is_reg]
        if not self.train_pool:
            raise ConfigError("[data] no training images (only regularisation images were found)")
        self._cache: dict[int, list[list[tuple[int, int, int]]]] = {}

    def epoch_indices(self, epoch: int) -> list[int]:
        idx = list(self.train_pool)
        if self.reg_pool:
            n, m = len(self.train_pool), len(self.reg_pool)
            start = (epoch * n) % m
            idx += [self.reg_pool[(start + k) % m] for k in range(n)]
        return idx

    def batches(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        if epoch in self._cache:
            return self._cache[epoch]
        rng = _rng(self.seed, "order", epoch)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i in self.epoch_indices(epoch):
            by_bucket.setdefault(self.items[i].bucket, []).append(i)
        batches: list[list[int]] = []
        for b in sorted(by_bucket):
            lst = by_bucket[b]
            rng.shuffle(lst)
            batches += [lst[k:k + self.bs] for k in range(0, len(lst), self.bs)]
        rng.shuffle(batches)
        k = 0
        while len(batches) % self.num_replicas:
            batches.append(list(batches[k]))
            k += 1
        keyed, slot = [], 0
        for b in batches:
            keyed.append([(i, epoch, slot + j) for j, i in enumerate(b)])
            slot += len(b)
        if len(self._cache) > 4:
            self._cache.clear()
        self._cache[epoch] = keyed
        return keyed

    def __iter__(self):
        return iter(self.batches(self.epoch))

    def __len__(self):
        return len(self.batches(self.epoch))


# --------------------------------------------------------------------------------------
# Dataset info for metadata
# --------------------------------------------------------------------------------------


def tag_frequency(subsets: Iterable[Subset], separator: str = ",") -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per folder name, how many captions hold each tag."""
    out: dict[str, dict[str, int]] = {}
    for s in subsets:
        freq = out.setdefault(os.path.basename(s.folder.rstrip("/\\")), {})
        for it in s.items:
            for t in set(split_tags(it.caption, separator)):
                freq[t] = freq.get(t, 0) + 1
    return out


def dataset_dirs(subsets: Iterable[Subset]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_dataset_dirs`` / ``ss_reg_dataset_dirs``: ``{folder: {n_repeats, img_count}}``."""
    return {os.path.basename(s.folder.rstrip("/\\")): {"n_repeats": s.repeats, "img_count": len(s.items)}
            for s in subsets}


def bucket_info(items: Iterable[ImageItem]) -> dict[str, Any]:
    counts: dict[tuple[int, int], int] = {}
    for it in items:
        counts[it.bucket] = counts.get(it.bucket, 0) + it.repeats
    return {"buckets": {str(i): {"resolution": list(b), "count": c}
                        for i, (b, c) in enumerate(sorted(counts.items()))}}


def describe(subsets: Sequence[Subset]) -> str:
    return json.dumps(dataset_dirs(subsets))

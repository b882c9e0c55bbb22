"""The world's judge: a small CNN that says which shape, colour, background and texture an image
shows — this world's stand-in for CLIP when measuring what a generated image depicts.

It is trained on the **full** world (base shapes *and* concept shapes, plain *and* concept
textures), so it recognises a concept the base model has never seen. Training images are
augmented with the kinds of damage a generated image has (blur, noise, small colour shifts), so
the classifier judges samples, not only clean renders.

Architecture: a full-resolution 3×3 stem (16 channels), then 3 stages of two 3×3 convolutions
(widths 32, 64, 128, the first of each with stride 2: 32 → 16 → 8 → 4 px; GroupNorm, SiLU),
global average pooling to a 128-d feature vector (:meth:`Classifier.features`, for diversity
measures), one linear head per attribute. ~0.29 M parameters, shipped as
``lyco/data/world/classifier.safetensors`` (about 1.2 MB).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lyco.world import scene

#: The classifier's heads and their classes, in label order.
HEADS: dict[str, tuple[str, ...]] = {
    "shape": scene.ALL_SHAPES,
    "colour": tuple(scene.COLOURS),
    "background": tuple(scene.BACKGROUNDS),
    "texture": scene.TEXTURES,
}

#: The shipped weights.
WEIGHTS = Path(__file__).resolve().parent.parent / "data" / "world" / "classifier.safetensors"

WIDTHS = (16, 32, 64, 128)


def labels_of(attrs: Sequence[scene.Attrs]) -> dict[str, torch.Tensor]:
    """``{head: LongTensor N}`` of class indices."""
    index = {h: {c: i for i, c in enumerate(cls)} for h, cls in HEADS.items()}
    return {h: torch.tensor([index[h][getattr(a, h)] for a in attrs], dtype=torch.long) for h in HEADS}


class Classifier(nn.Module):
    """Multi-head CNN over ``N×3×H×W`` images in ``[-1, 1]`` (resized to the world's image size
    when they are another size)."""

    def __init__(self, widths: Sequence[int] = WIDTHS, heads: dict[str, Sequence[str]] | None = None):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.heads = {h: tuple(c) for h, c in (heads or HEADS).items()}
        # a full-resolution stem, then one stride-2 stage per further width (32 → 16 → 8 → 4 px)
        layers: list[nn.Module] = [nn.Conv2d(3, self.widths[0], 3, 1, 1), nn.GroupNorm(8, self.widths[0]), nn.SiLU()]
        cin = self.widths[0]
        for w in self.widths[1:]:
            layers += [nn.Conv2d(cin, w, 3, 2, 1), nn.GroupNorm(8, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, 1, 1), nn.GroupNorm(8, w), nn.SiLU()]
            cin = w
        self.body = nn.Sequential(*layers)
        self.out = nn.ModuleDict({h: nn.Linear(cin, len(c)) for h, c in self.heads.items()})

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def _prep(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Classifier: expected images N×3×H×W in [-1, 1], got shape {tuple(images.shape)}")
        p = next(self.parameters())
        x = images.to(device=p.device, dtype=p.dtype)
        if x.shape[-2:] != (scene.IMAGE_SIZE, scene.IMAGE_SIZE):
            x = F.interpolate(x, size=(scene.IMAGE_SIZE, scene.IMAGE_SIZE), mode="bilinear",
                              antialias=True, align_corners=False)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``N×feature_dim`` (global average of the last stage)."""
        return self.body(self._prep(images)).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {h: lin(f) for h, lin in self.out.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{head: (labels LongTensor N, probs FloatTensor N×C)}`` (eval mode, no grad, on CPU)."""
        was = self.training
        self.eval()
        try:
            chunks = [self(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
        finally:
            self.train(was)
        out = {}
        for h in self.heads:
            probs = torch.cat([c[h] for c in chunks]).float().softmax(-1).cpu()
            out[h] = (probs.argmax(-1), probs)
        return out

    def predict_attrs(self, images: torch.Tensor) -> list[scene.Attrs]:
        """The most likely description of each image."""
        pred = self.predict(images)
        idx = {h: pred[h][0].tolist() for h in self.heads}
        return [scene.Attrs(*(self.heads[h][idx[h][i]] for h in ("shape", "colour", "background", "texture")))
                for i in range(images.shape[0])]


# ----------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------

def save(clf: Classifier, path: str | Path, *, recipe: dict | None = None) -> Path:
    """Write ``clf`` as safetensors (temporary name, then renamed); heads, widths and ``recipe``
    in the metadata."""
    from lyco.formats.safetensors_io import save_tensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in clf.state_dict().items()}
    meta = {"lyco.world.heads": json.dumps(clf.heads), "lyco.world.widths": json.dumps(list(clf.widths)),
            "lyco.world.recipe": json.dumps(recipe or {}, sort_keys=True, default=str), "format": "pt"}
    save_tensors(sd, path, metadata=meta, overwrite=True)  # temporary name, fsync, rename
    return path


def is_trained() -> bool:
    """Whether the shipped classifier weights are present."""
    return WEIGHTS.is_file()


def load(device="cpu", weights: str | Path | None = None) -> Classifier:
    """The trained classifier (eval mode) from ``weights`` (default: the shipped file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(weights) if weights is not None else WEIGHTS
    if not path.is_file():
        hint = (" — the trained classifier is not shipped in this checkout; reproduce it with "
                "`python -m lyco.world.pretrain --out DIR --device cuda` (see benchmarks/run_pretrain.sh)"
                if weights is None else "")
        raise FileNotFoundError(f"{path}: no such weights file{hint}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    try:
        heads = json.loads(meta["lyco.world.heads"])
        widths = json.loads(meta["lyco.world.widths"])
    except KeyError as e:
        raise ValueError(f"{path}: no {e.args[0]!r} in the safetensors metadata "
                         f"(not a world classifier written by lyco.world.classifier.save)") from None
    if {h: tuple(c) for h, c in heads.items()} != HEADS:
        raise ValueError(f"{path}: classifier heads {heads} differ from this version's world {HEADS}")
    clf = Classifier(widths, heads)
    try:
        clf.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the classifier ({e})") from None
    return clf.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Training and measuring
# ----------------------------------------------------------------------------------------------

def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The damage a generated image may carry: per-image blur (30 %), gain/offset/colour shift
    (±8 %), Gaussian noise (σ up to 0.08). ``gen`` is a generator on ``x``'s device."""
    n = x.shape[0]
    dev = x.device

    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(shape, generator=gen, device=dev)

    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    mix = (u(n, 1, 1, 1) < 0.3).float() * u(n, 1, 1, 1, lo=0.3, hi=1.0)
    x = x * (1 - mix) + blur * mix
    x = x * u(n, 3, 1, 1, lo=0.92, hi=1.08) + u(n, 3, 1, 1, lo=-0.08, hi=0.08)
    x = x + torch.randn(x.shape, generator=gen, device=dev) * u(n, 1, 1, 1, hi=0.08)
    return x.clamp(-1, 1)


def render_sampler(batch: int, seed: int, device="cpu") -> Callable[[int], tuple[torch.Tensor, dict]]:
    """``step -> (images, labels)``: fresh full-world renders, deterministic from ``(seed, step)``."""
    def sample(step: int):
        imgs, attrs = scene.random_batch(batch, np.random.default_rng([int(seed), 31337, int(step)]), world="full")
        return scene.to_tensor(imgs).to(device), {h: v.to(device) for h, v in labels_of(attrs).items()}
    return sample


def fit(clf: Classifier, sampler: Callable[[int], tuple[torch.Tensor, dict]], steps: int, *, lr: float = 2e-3,
        seed: int = 0, time_limit: float | None = None, log_every: int = 0, autocast: bool = False,
        log: Callable[[str], None] = print) -> dict:
    """Train ``clf`` in place: AdamW (weight decay 1e-4), linear warm-up then cosine decay to 5 %,
    cross-entropy summed over heads, :func:`augment` on every batch. At most ``steps``; with
    ``time_limit`` (seconds) the number of steps is fixed early so the schedule ends inside it
    (``lyco.world._timebox``). Returns ``{"steps", "loss", "seconds", "ms_per_step"}``."""
    from lyco.world._timebox import StepPlan

    dev = next(clf.parameters()).device
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    plan = StepPlan(steps, time_limit, sync=(torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)),
                    log=log, name="classifier")
    warm = max(1, min(100, steps // 20))

    def factor(s):
        return min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, plan.total)))))

    gen = torch.Generator(device=dev).manual_seed(int(seed) + 7)
    clf.train()
    step = 0
    loss = torch.zeros(())
    while step < plan.total:
        for g in opt.param_groups:
            g["lr"] = lr * factor(step)
        x, y = sampler(step)
        x = augment(x, gen)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            logits = clf(x)
        loss = sum(F.cross_entropy(logits[h].float(), y[h]) for h in clf.heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if log_every and (step % log_every == 0 or step == plan.total or step == 1):
            log(f"classifier step {step}/{plan.total} loss {loss.item():.4f} ({plan.elapsed():.1f}s)")
        if not plan.after(step):
            break
    clf.eval()
    return {"steps": step, "loss": float(loss.detach()), "seconds": plan.elapsed(), "ms_per_step": plan.ms_per_step}


def train_classifier(steps: int = 1500, device="cpu", seed: int = 0, *, batch: int = 128, lr: float = 2e-3,
                     log_every: int = 0) -> Classifier:
    """A classifier trained from scratch on freshly rendered full-world images (CPU: ~1500 steps of
    128 reach ≥ 99 % on every head in a few minutes; the shipped one is trained by
    ``lyco.world.pretrain``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        clf = Classifier().to(device)
    fit(clf, render_sampler(batch, seed, device), steps, lr=lr, seed=seed, log_every=log_every)
    return clf


@torch.no_grad()
def agreement(clf: Classifier, images: torch.Tensor, attrs: Sequence[scene.Attrs],
              heads: Sequence[str] | None = None) -> dict[str, float]:
    """Per head, the fraction of ``images`` whose predicted class is the one in ``attrs`` (plus
    ``"all"``: every requested head right)."""
    heads = list(heads or clf.heads)
    pred = clf.predict(images)
    truth = labels_of(attrs)
    ok = {h: pred[h][0] == truth[h] for h in heads}
    out = {h: float(v.float().mean()) for h, v in ok.items()}
    out["all"] = float(torch.stack([ok[h] for h in heads]).all(0).float().mean())
    return out


def accuracy(clf: Classifier, n: int = 1000, seed: int = 12345) -> dict[str, float]:
    """Per-head accuracy on ``n`` freshly rendered full-world images (a random stream disjoint from
    the training one: seed ``[seed, 271828]``)."""
    imgs, attrs = scene.random_batch(n, np.random.default_rng([int(seed), 271828]), world="full")
    return agreement(clf, scene.to_tensor(imgs), attrs)

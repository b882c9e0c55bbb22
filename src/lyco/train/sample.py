"""Sample grids: fixed prompts × fixed seeds through the diffusers pipeline, labelled, one PNG.

Rows are prompts, columns are seeds; with ``compare_base`` every seed gets a second column made
with the adapter switched off (multiplier 0), so the effect of training is visible side by side.
The pipeline's own RNG is never touched: each image uses a ``torch.Generator`` seeded with its
seed, and the global RNG state is restored afterwards, so sampling during training does not change
what the training computes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Sequence

import torch

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}
MIN_CELL = 128  # tiny images are enlarged (nearest) to at least this for viewing


def make_scheduler(pipe, sampler: str, *, prediction_type: str | None = None, zero_terminal_snr: bool = False):
    """A sampling scheduler from the pipeline's config (``default`` = the pipeline's own class)."""
    import diffusers
    cfg = dict(pipe.scheduler.config)
    cls = type(pipe.scheduler) if sampler == "default" else getattr(diffusers, SCHEDULERS[sampler])
    extra = {}
    if prediction_type:
        extra["prediction_type"] = prediction_type
    if zero_terminal_snr:
        extra["rescale_betas_zero_snr"] = True
        extra["timestep_spacing"] = "trailing"
    return cls.from_config(cfg, **extra)


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], *, negative_prompt: str = "", steps: int = 20,
             guidance_scale: float = 7.0, width: int = 512, height: int = 512, scheduler=None,
             clip_skip: int | None = None, autocast: Callable[[], contextlib.AbstractContextManager] | None = None):
    """``images[prompt][seed]`` (PIL)."""
    old_sched = pipe.scheduler
    if scheduler is not None:
        pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    rows = []
    try:
        with torch.random.fork_rng(devices=[]), (autocast() if autocast else contextlib.nullcontext()):
            for prompt in prompts:
                gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
                neg = [negative_prompt] * len(seeds) if negative_prompt else None  # SDXL: None = zeros
                kw = dict(prompt=[prompt] * len(seeds), negative_prompt=neg,
                          num_inference_steps=steps, guidance_scale=guidance_scale, width=width, height=height,
                          generator=gens, output_type="pil")
                if clip_skip:
                    kw["clip_skip"] = clip_skip
                rows.append(list(pipe(**kw).images))
    finally:
        pipe.scheduler = old_sched
    return rows


def _font(size: int = 12):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(text: str, width_px: int, font, draw) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        trial = (cur + " " + w).strip()
        if draw.textlength(trial, font=font) <= width_px or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    return lines or [""]


def make_grid(rows: Sequence[Sequence], row_labels: Sequence[str], col_labels: Sequence[str],
              title: str = ""):
    """A labelled grid image: a title line, column labels on top, row labels (wrapped) on the left."""
    from PIL import Image, ImageDraw
    cw = max(max(im.size[0] for r in rows for im in r), MIN_CELL)
    ch = max(max(im.size[1] for r in rows for im in r), MIN_CELL)
    font = _font(12)
    pad, label_w, line_h = 6, 180, 15
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = (line_h + pad) if title else 0
    head_h = line_h + pad
    W = label_w + len(col_labels) * (cw + pad) + pad
    H = title_h + head_h + len(rows) * (ch + pad) + pad
    grid = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    if title:
        d.text((pad, pad // 2), title, fill=(0, 0, 0), font=font)
    for j, lab in enumerate(col_labels):
        d.text((label_w + j * (cw + pad) + pad, title_h + pad // 2), lab, fill=(40, 40, 40), font=font)
    for i, (row, lab) in enumerate(zip(rows, row_labels)):
        y = title_h + head_h + i * (ch + pad)
        for k, line in enumerate(_wrap(lab, label_w - 2 * pad, font, probe)[: max(1, ch // line_h)]):
            d.text((pad, y + k * line_h), line, fill=(0, 0, 0), font=font)
        for j, im in enumerate(row):
            if im.size != (cw, ch):
                scale = min(cw / im.size[0], ch / im.size[1])
                im = im.resize((max(1, int(im.size[0] * scale)), max(1, int(im.size[1] * scale))),
                               Image.Resampling.NEAREST)
            grid.paste(im, (label_w + j * (cw + pad) + pad, y))
    return grid


def sample_grid(pipe, path: str | Path, prompts: Sequence[str], seeds: Sequence[int], *, network=None,
                compare_base: bool = False, title: str = "", **gen_kw):
    """Generate and write a labelled grid PNG (atomically). With ``network`` and ``compare_base``,
    each seed also gets a column with the adapter off. Returns ``(path, grid image)``."""
    from ..formats.safetensors_io import atomic_write
    was_training = network.training if network is not None else None
    if network is not None:
        network.eval()
    try:
        with_adapter = generate(pipe, prompts, seeds, **gen_kw)
        cols = [f"seed {s}" for s in seeds]
        rows = with_adapter
        if network is not None and compare_base:
            network.disable()
            try:
                base = generate(pipe, prompts, seeds, **gen_kw)
            finally:
                network.enable()
            rows = [[x for pair in zip(b, a) for x in pair] for b, a in zip(base, with_adapter)]
            cols = [c for s in seeds for c in (f"seed {s} base", f"seed {s} adapter")]
    finally:
        if network is not None and was_training:
            network.train()
    grid = make_grid(rows, list(prompts), cols, title)
    with atomic_write(path, overwrite=True) as f:
        grid.save(f, format="PNG")
    return str(path), grid

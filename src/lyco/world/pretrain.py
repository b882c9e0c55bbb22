"""Pretrain the world's base model and classifier from scratch (one GPU, a few minutes).

Usage::

    python -m lyco.world.pretrain --out DIR --device cuda --minutes 6 --seed 0
    python -m lyco.world.pretrain --out /tmp/pt --device cpu --minutes 1 --smoke   # plumbing check

``benchmarks/run_pretrain.sh`` is the one-liner for the GPU machine. Everything lands flat in
``--out`` (at most 7 files, each well under 16 MB):

* ``base.safetensors`` — the base (VAE + text encoder + UNet, fp32, configs and recipe in the
  metadata); copy it to ``src/lyco/data/world/base.safetensors`` to ship it;
* ``classifier.safetensors`` — the classifier; ship as ``src/lyco/data/world/classifier.safetensors``;
* ``recipe.json`` — seed, steps, batch sizes, learning rates, wall time and final loss per stage,
  torch/diffusers versions, device name, and the measurements below;
* ``samples.png`` — rows: prompts (8 base-world prompts, then the two concepts' trigger prompts,
  which the base must *not* know), columns: seeds;
* ``vae_recon.png`` — held-out full-world images (odd rows) and their VAE reconstructions (even rows);
* ``log.txt`` — the progress log.

The recipe (decisions, each written where it is made):

0. **Data**: two pools rendered once in worker processes (forked before CUDA starts): the *base
   world* (what the UNet and text encoder learn) and the *full world* (concepts included; for the
   VAE — a general image codec like SD's, which can represent a stripe it was never prompted for —
   and for the classifier). The UNet and text encoder never see a concept or a trigger word.
1. **VAE** (15 % of the time): L1 + MSE reconstruction + 1e-5 × KL (per element), AdamW 1e-3,
   half base / half full world; then ``scaling_factor = 1 / std(latents)`` over base images.
2. **Text encoder + UNet** jointly (the rest but ~15 %): v-prediction on SD's scaled-linear
   1000-step schedule (the pipeline's DDIM config; ``DDPMScheduler.from_config`` of it gives the
   same ``alphas_cumprod``), plain MSE uniform over timesteps, 10 % caption dropout (the empty
   prompt, for classifier-free guidance), AdamW 8e-4 (β 0.9/0.99, wd 0.01), 200 warm-up steps,
   cosine to 10 %, grad-norm clip 1, bf16 autocast on CUDA, EMA 0.999 of both (the EMA weights are
   shipped). Latents are encoded once for the whole pool (posterior mean and std; a fresh
   posterior sample every step); the text encoder runs once per step on the 97 distinct captions.
   Each time-boxed stage fixes its number of steps after timing steps 10–40 (``_timebox``);
   ``--vae-steps``/``--unet-steps`` set them explicitly (the recipe records what was used).
3. **Classifier** (8 %): :func:`lyco.world.classifier.fit` on the full-world pool, batch 512, AdamW 2e-3.
4. **Measurements** (the rest): the classifier's accuracy on fresh held-out renders; its
   agreement with the prompts of the base's samples (every base-world description × 4 seeds,
   25 DDIM steps, guidance 4) — the proof that the samples are recognisable; the same on VAE
   reconstructions (can the latent space hold the concepts?); and, for each concept, how often
   the base draws it when prompted with the trigger word (should be about chance).
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from lyco.world import scene

_T0 = time.perf_counter()
_LOG: list[str] = []
_LOG_PATH: Path | None = None


def log(msg: str) -> None:
    line = f"[{time.perf_counter() - _T0:7.1f}s] {msg}"
    print(line, flush=True)
    _LOG.append(line)
    if _LOG_PATH is not None:
        with open(_LOG_PATH, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Pools (rendered in forked workers into shared memory)
# ----------------------------------------------------------------------------------------------

_POOL: dict = {}
_CHUNK = 4096
# class indices in the order of ``classifier.HEADS`` (shape, colour, background, texture); computed
# here without importing the classifier (torch) in the render workers
_COLOUR_INDEX = {c: i for i, c in enumerate(scene.COLOURS)}
_BACKGROUND_INDEX = {b: i for i, b in enumerate(scene.BACKGROUNDS)}


def _render_chunk(args):
    k, start, n, world, seed, tag = args
    g = np.random.default_rng([int(seed), int(tag), int(k)])
    attrs = scene.sample_attrs_batch(n, g, world=world)
    _POOL["images"][start:start + n] = scene.render_many(attrs, g)
    return start, np.array([[scene.ALL_SHAPES.index(a.shape), _COLOUR_INDEX[a.colour],
                             _BACKGROUND_INDEX[a.background], scene.TEXTURES.index(a.texture)] for a in attrs], np.int16)


def render_pool(n: int, world: str, seed: int, tag: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8 N×S×S×3) and their class indices (N×4, in ``classifier.HEADS`` order),
    chunk ``k`` drawn from the generator ``[seed, tag, k]`` — the same pool for any ``workers``."""
    S = scene.IMAGE_SIZE
    buf = mmap.mmap(-1, max(1, n * S * S * 3))  # anonymous MAP_SHARED: forked workers write into it
    images = np.frombuffer(buf, np.uint8, count=n * S * S * 3).reshape(n, S, S, 3)
    _POOL["images"] = images
    jobs = [(k, s, min(_CHUNK, n - s), world, seed, tag) for k, s in enumerate(range(0, n, _CHUNK))]
    labels = np.zeros((n, 4), np.int16)
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(_render_chunk, jobs)
    else:
        results = [_render_chunk(j) for j in jobs]
    for s, lab in results:
        labels[s:s + len(lab)] = lab
    return images, labels


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    f = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * f))


def noisy_and_target(x0, noise, t, alphas_cumprod):
    """The forward process and the v-prediction target at integer timesteps ``t``:
    ``x_t = √ᾱ·x0 + √(1-ᾱ)·ε`` and ``v = √ᾱ·ε - √(1-ᾱ)·x0`` (what ``DDPMScheduler.add_noise`` and
    ``get_velocity`` compute; tested against them)."""
    a = alphas_cumprod[t].view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, a.sqrt() * noise - (1 - a).sqrt() * x0


def _to_float(x_uint8, dtype=None):
    """uint8 N×H×W×3 (any device) → float N×3×H×W in [-1, 1]."""
    import torch
    x = x_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x if dtype is None else x.to(dtype)


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------

def _plan(steps, fixed, time_limit, device, name):
    from lyco.world._timebox import StepPlan
    return StepPlan(steps, time_limit, fixed=fixed, sync=lambda: _sync(device), log=log, name=name)


def train_vae(vae, base_pool, full_pool, *, device, steps, fixed, batch, lr, time_limit, seed, autocast, log_every,
              kl_weight=1e-5):
    """VAE stage: half base-world, half full-world images; L1 + MSE + ``kl_weight`` × KL (means over
    elements); AdamW, 100 warm-up steps, cosine to 10 %."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(seed + 11)
    plan = _plan(steps, fixed, time_limit, device, "vae")
    warm = max(1, min(100, steps // 10))
    vae.train()
    half = batch // 2
    stats = {}
    step = 0
    while step < plan.total:
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, plan.total, warm)
        ib = torch.randint(0, base_pool.shape[0], (half,), device=device, generator=gen)
        iff = torch.randint(0, full_pool.shape[0], (batch - half,), device=device, generator=gen)
        x = _to_float(torch.cat([base_pool[ib], full_pool[iff]]))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, device=device, generator=gen)
            rec = vae.decode(z).sample
        rec = rec.float()
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        mean, logvar = post.mean.float(), post.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = l1 + mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % log_every == 0 or step == plan.total or step == 1:
            stats = {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}
            log(f"vae step {step}/{plan.total} l1 {stats['l1']:.4f} mse {stats['mse']:.5f} kl {stats['kl']:.2f}")
        if not plan.after(step):
            break
    _sync(device)
    vae.eval()
    stats.update(steps=step, seconds=plan.elapsed(), ms_per_step=plan.ms_per_step, kl_weight=kl_weight,
                 final={"l1": l1.item(), "mse": mse.item(), "kl": kl.item()})
    return stats


def encode_pool(vae, pool, device, chunk=4096):
    """Posterior mean and std of every pool image (fp32, on ``device``)."""
    import torch
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, pool.shape[0], chunk):
            post = vae.encode(_to_float(pool[i:i + chunk])).latent_dist
            means.append(post.mean.float())
            stds.append(post.std.float())
    return torch.cat(means), torch.cat(stds)


def train_unet(unet, text_encoder, lat_mean, lat_std, combos, caption_ids, *, device, steps, fixed, batch, lr,
               time_limit, seed, autocast, log_every, scheduler_config, scaling, ema_decay=0.999,
               dropout=0.1, warmup=200):
    """Joint text encoder + UNet training (plain v-prediction MSE, uniform over the 1000 training
    timesteps — no min-SNR weighting: that would down-weight the noisy timesteps, where the layout
    and colours of an image are decided). Leaves the EMA weights in the modules."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(scheduler_config)
    if ddpm.config.prediction_type != "v_prediction":
        raise ValueError(f"pretraining is written for v_prediction, the scheduler says {ddpm.config.prediction_type!r}")
    ac = ddpm.alphas_cumprod.to(device=device, dtype=torch.float32)
    n_t = ac.shape[0]
    params = [p for m in (unet, text_encoder) for p in m.parameters()]
    ema = [p.detach().clone().float() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator(device=device).manual_seed(seed + 23)
    plan = _plan(steps, fixed, time_limit, device, "unet")
    warm = max(1, min(warmup, steps // 10))
    empty = caption_ids.shape[0] - 1  # the last row is the empty prompt
    ema_good = [e.clone() for e in ema]
    restarts = 0
    unet.train()
    text_encoder.train()
    step = 0
    curve = []
    while step < plan.total:
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, plan.total, warm)
        idx = torch.randint(0, lat_mean.shape[0], (batch,), device=device, generator=gen)
        eps_post = torch.randn((batch,) + tuple(lat_mean.shape[1:]), device=device, generator=gen)
        x0 = (lat_mean[idx] + lat_std[idx] * eps_post) * scaling
        noise = torch.randn(x0.shape, device=device, generator=gen)
        t = torch.randint(0, n_t, (batch,), device=device, generator=gen)
        noisy, target = noisy_and_target(x0, noise, t, ac)
        cap = combos[idx]
        drop = torch.rand((batch,), device=device, generator=gen) < dropout
        cap = torch.where(drop, torch.full_like(cap, empty), cap)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            hidden_all = text_encoder(caption_ids)[0]              # every distinct caption once
            pred = unet(noisy, t, encoder_hidden_states=hidden_all[cap]).sample
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        step += 1
        if step % log_every == 0 or step == plan.total or step == 1:
            lv = loss.item()
            if not math.isfinite(lv):  # diverged: back to the last good EMA, half the learning rate
                with torch.no_grad():
                    for p, e, g in zip(params, ema, ema_good):
                        p.copy_(g)
                        e.copy_(g)
                opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
                lr *= 0.5
                restarts += 1
                log(f"unet step {step}: loss {lv} — restored the last good EMA weights, lr now {lr:.2e}")
                if restarts > 3:
                    raise FloatingPointError("unet training diverged 4 times")
                continue
            ema_good = [e.clone() for e in ema]
            curve.append([step, round(lv, 5)])
            log(f"unet step {step}/{plan.total} loss {lv:.4f} lr {opt.param_groups[0]['lr']:.2e}")
        if not plan.after(step):
            break
    _sync(device)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e.to(p.dtype))
    unet.eval()
    text_encoder.eval()
    return {"steps": step, "seconds": plan.elapsed(), "ms_per_step": plan.ms_per_step, "final_loss": loss.item(),
            "loss_curve": curve[-30:], "ema": ema_decay, "caption_dropout": dropout, "warmup": warm,
            "divergence_restarts": restarts}


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------

def generate(pipe, prompts, seeds, *, device, steps, guidance, batch=512):
    """Images (float N×3×H×W in [-1, 1], CPU) for ``prompts[i]`` with ``seeds[i]``."""
    import torch
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds[i:i + batch]]
        with torch.no_grad():
            im = pipe(list(prompts[i:i + batch]), num_inference_steps=steps, guidance_scale=guidance,
                      generator=gens, output_type="pt").images
        out.append(im.float().cpu() * 2 - 1)
    return torch.cat(out)


def measure(out: Path, base_path: Path, clf, *, device, steps, guidance, seeds_per_prompt, full_holdout, smoke,
            n_prompts=0):
    import torch
    from lyco.world import base as B
    from lyco.world import classifier as C

    res = {}
    pipe = B.load_pipeline(device=device, weights=base_path)
    pipe.set_progress_bar_config(disable=True)
    attrs = list(scene._iter_all("base"))
    if n_prompts:
        attrs = [attrs[i] for i in np.random.default_rng(0).permutation(len(attrs))[:n_prompts]]
    prompts, truth, seeds = [], [], []
    for k, a in enumerate(attrs):
        for s in range(seeds_per_prompt):
            prompts.append(scene.caption(a))
            truth.append(a)
            seeds.append(1000 * s + k)
    t0 = time.perf_counter()
    imgs = generate(pipe, prompts, seeds, device=device, steps=steps, guidance=guidance)
    res["samples"] = {"n": len(prompts), "steps": steps, "guidance": guidance,
                      "agreement": C.agreement(clf, imgs, truth, heads=["shape", "colour", "background"]),
                      "seconds": time.perf_counter() - t0}
    # per shape: which shapes are hard
    pred = clf.predict(imgs)["shape"][0]
    res["samples"]["shape_accuracy_by_shape"] = {
        s: float((pred[[i for i, a in enumerate(truth) if a.shape == s]] == C.HEADS["shape"].index(s)).float().mean())
        for s in sorted({a.shape for a in truth})}
    res["samples"]["texture_plain_rate"] = float((clf.predict(imgs)["texture"][0] == 0).float().mean())
    log(f"base samples vs prompts (classifier agreement): {res['samples']['agreement']}")
    # concepts: how often does the base draw the concept when prompted with the trigger word?
    res["concept_baseline"] = {}
    for name, c in scene.CONCEPTS.items():
        pairs = scene.eval_set(name, 2 if smoke else 48, seed=1)
        ps = [p for p, _ in pairs]
        ims = generate(pipe, ps, list(range(len(ps))), device=device, steps=steps, guidance=guidance)
        p = clf.predict(ims)
        head = "shape" if c.kind == "shape" else "texture"
        rate = float((p[head][0] == C.HEADS[head].index(c.value)).float().mean())
        res["concept_baseline"][name] = {"trigger": c.trigger, "prompt_example": ps[0],
                                         f"{head}_is_{c.value}_rate": rate}
    log(f"concept baseline (base prompted with trigger words): {res['concept_baseline']}")
    # VAE: can the latent space hold every attribute, concepts included?
    vae = pipe.vae
    with torch.no_grad():
        x = scene.to_tensor(full_holdout[0]).to(device)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1).cpu()
    res["vae_reconstruction"] = {"mse": float(((rec - x.cpu()) ** 2).mean()),
                                 "agreement": C.agreement(clf, rec, full_holdout[1])}
    log(f"vae reconstructions: {res['vae_reconstruction']}")
    # the grids
    n_cols = 8
    rows = [p for p, _ in scene.eval_set(None, 8, seed=0)] + [scene.eval_set(n, 1, seed=2)[0][0] for n in scene.CONCEPTS]
    if smoke:
        rows, n_cols = rows[:2], 2
    gp = [p for p in rows for _ in range(n_cols)]
    gs = [s for _ in rows for s in range(n_cols)]
    grid = generate(pipe, gp, gs, device=device, steps=steps, guidance=guidance)
    scene.save_grid(scene.to_uint8(grid), out / "samples.png", n_cols, scale=3)
    res["samples_png_rows"] = rows
    k = min(32, x.shape[0])
    inter = torch.cat([torch.cat([o, r]) for o, r in zip(x.cpu()[:k].split(8), rec[:k].split(8))])
    scene.save_grid(scene.to_uint8(inter), out / "vae_recon.png", 8, scale=3)
    return res


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    global _LOG_PATH
    p = argparse.ArgumentParser(prog="python -m lyco.world.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created; files are replaced)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--minutes", type=float, default=6.0, help="time box for all stages (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny pools and a few steps per stage (plumbing check)")
    p.add_argument("--batch", type=int, default=1024, help="UNet batch (default 1024)")
    p.add_argument("--vae-batch", type=int, default=256)
    p.add_argument("--clf-batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=8e-4, help="UNet + text encoder peak learning rate")
    p.add_argument("--unet-steps", type=int, default=None, help="fix the UNet steps (default: fit the time box)")
    p.add_argument("--vae-steps", type=int, default=None, help="fix the VAE steps (default: fit its time box)")
    p.add_argument("--clf-steps", type=int, default=6000, help="classifier steps (at most; also time-boxed)")
    p.add_argument("--base-pool", type=int, default=262144, help="base-world images rendered for the UNet")
    p.add_argument("--full-pool", type=int, default=65536, help="full-world images for the VAE and classifier")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--no-autocast", action="store_true", help="train in fp32 on CUDA too")
    p.add_argument("--measure-prompts", type=int, default=0, help="base-world prompts to sample (default 0: all 96)")
    p.add_argument("--measure-seeds", type=int, default=4, help="seeds per prompt (default 4)")
    a = p.parse_args(argv)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    _LOG_PATH = out / "log.txt"
    _LOG_PATH.write_text("", encoding="utf-8")
    budget = a.minutes * 60.0
    start = time.perf_counter()
    deadline = start + budget
    if a.smoke:  # a plumbing check: tiny pools and batches, a few steps per stage, no time limits
        a.base_pool, a.full_pool, a.batch, a.vae_batch, a.clf_batch = 256, 256, 8, 8, 16
        a.workers = min(a.workers, 2)
        a.vae_steps, a.unet_steps, a.clf_steps = 3, 3, 3
        a.measure_prompts, a.measure_seeds = 2, 1
        budget = 1e9
        deadline = start + budget

    # 0. pools, rendered before CUDA starts (the workers are forked)
    t = time.perf_counter()
    base_imgs, base_lab = render_pool(a.base_pool, "base", a.seed, 1, a.workers)
    full_imgs, full_lab = render_pool(a.full_pool, "full", a.seed, 2, a.workers)
    hold_attrs = scene.sample_attrs_batch(16 if a.smoke else 1024, np.random.default_rng([a.seed, 3]), world="full")
    hold = (scene.render_many(hold_attrs, np.random.default_rng([a.seed, 4])), hold_attrs)
    t_render = time.perf_counter() - t
    log(f"rendered {a.base_pool} base + {a.full_pool} full-world images in {t_render:.1f}s ({a.workers} workers)")

    import torch
    import diffusers
    import transformers
    from lyco.world import base as B
    from lyco.world import classifier as C

    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    autocast = device.type == "cuda" and not a.no_autocast
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    recipe: dict = {
        "seed": a.seed, "minutes": a.minutes, "smoke": a.smoke, "device": dev_name,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0], "image_size": scene.IMAGE_SIZE,
        "pools": {"base": a.base_pool, "full": a.full_pool, "render_seconds": t_render},
        "command": " ".join(["python -m lyco.world.pretrain"] + list(sys.argv[1:] if argv is None else argv)),
        "stages": {},
    }

    def write_recipe():
        _atomic_write_text(out / "recipe.json", json.dumps(B._jsonable(recipe), indent=1, sort_keys=True) + "\n")

    comps = B.build(a.seed)
    vae, te, unet = comps["vae"].to(device), comps["text_encoder"].to(device), comps["unet"].to(device)
    base_gpu = torch.from_numpy(base_imgs).to(device)
    full_gpu = torch.from_numpy(full_imgs).to(device)
    recipe["parameters"] = {c: sum(p.numel() for p in comps[c].parameters()) for c in B.COMPONENTS}
    log(f"device {dev_name}; parameters {recipe['parameters']}; autocast bf16: {autocast}")

    # 1. VAE
    vae_time = 0.15 * budget
    st = train_vae(vae, base_gpu, full_gpu, device=device, steps=a.vae_steps or 100000, fixed=a.vae_steps is not None,
                   batch=a.vae_batch, lr=1e-3, time_limit=vae_time, seed=a.seed, autocast=autocast,
                   log_every=1 if a.smoke else 250)
    lat_mean, lat_std = encode_pool(vae, base_gpu, device)
    z = lat_mean + lat_std * torch.randn(lat_mean.shape, device=device,
                                         generator=torch.Generator(device=device).manual_seed(a.seed + 5))
    scaling = float(1.0 / z.float().std())
    vae.register_to_config(scaling_factor=scaling)
    st.update(batch=a.vae_batch, lr=1e-3, scaling_factor=scaling, latent_mean=float(z.mean()))
    recipe["stages"]["vae"] = st
    log(f"vae done: {st['steps']} steps in {st['seconds']:.0f}s; scaling_factor {scaling:.4f}")
    base_path = out / "base.safetensors"
    recipe["completed"] = "vae"
    B.save_weights(comps, base_path, recipe=recipe)
    write_recipe()

    # 2. text encoder + UNet
    combos = torch.from_numpy((base_lab[:, 0].astype(np.int64) * len(scene.COLOURS) + base_lab[:, 1]) * len(scene.BACKGROUNDS)
                              + base_lab[:, 2]).to(device)
    caps = [scene.caption(scene.Attrs(s, c, b)) for s in scene.SHAPES for c in scene.COLOURS for b in scene.BACKGROUNDS]
    caps.append("")
    tok = comps["tokenizer"]
    caption_ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
    reserve = (0.08 + 0.07) * budget  # classifier + measurements
    unet_time = max(10.0, deadline - time.perf_counter() - reserve)
    st = train_unet(unet, te, lat_mean, lat_std, combos, caption_ids, device=device,
                    steps=a.unet_steps or 10 ** 7, fixed=a.unet_steps is not None, batch=a.batch, lr=a.lr,
                    time_limit=unet_time, seed=a.seed, autocast=autocast, log_every=1 if a.smoke else 250,
                    scheduler_config=dict(comps["scheduler"].config), scaling=scaling)
    st.update(batch=a.batch, lr=a.lr, prediction_type="v_prediction", time_budget_s=unet_time)
    recipe["stages"]["unet_text_encoder"] = st
    recipe["completed"] = "unet"
    del lat_mean, lat_std, z
    B.save_weights(comps, base_path, recipe=recipe)
    write_recipe()
    log(f"unet done: {st['steps']} steps in {st['seconds']:.0f}s, final loss {st['final_loss']:.4f}; wrote {base_path}")

    # 3. classifier
    full_lab_gpu = torch.from_numpy(full_lab.astype(np.int64)).to(device)
    heads = list(C.HEADS)
    cgen = torch.Generator(device=device).manual_seed(a.seed + 31)

    def pool_sampler(step):
        i = torch.randint(0, full_gpu.shape[0], (a.clf_batch,), device=device, generator=cgen)
        return _to_float(full_gpu[i]), {h: full_lab_gpu[i, k] for k, h in enumerate(heads)}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(a.seed + 41)
        clf = C.Classifier().to(device)
    clf_time = max(5.0, min(0.08 * budget, deadline - time.perf_counter() - 0.06 * budget))
    clf_steps = a.clf_steps
    st = C.fit(clf, pool_sampler, clf_steps, lr=2e-3, seed=a.seed, time_limit=clf_time,
               log_every=1 if a.smoke else 500, autocast=autocast, log=log)
    clf = clf.float().eval()
    acc = C.accuracy(clf, n=16 if a.smoke else 2000, seed=a.seed + 12345)
    st.update(batch=a.clf_batch, lr=2e-3, planned_steps=clf_steps, heldout_accuracy=acc, parameters=sum(
        p.numel() for p in clf.parameters()))
    recipe["stages"]["classifier"] = st
    recipe["completed"] = "classifier"
    C.save(clf, out / "classifier.safetensors", recipe={"seed": a.seed, **{k: v for k, v in st.items()}})
    write_recipe()
    log(f"classifier: {st['steps']} steps in {st['seconds']:.0f}s, held-out accuracy {acc}")

    # 4. measurements
    t = time.perf_counter()
    try:
        res = measure(out, base_path, clf, device=device, steps=2 if a.smoke else B.SAMPLE_STEPS,
                      guidance=B.PROMPT_GUIDANCE, seeds_per_prompt=a.measure_seeds, full_holdout=hold,
                      smoke=a.smoke, n_prompts=a.measure_prompts)
        recipe["measurements"] = res
    except Exception as e:  # noqa: BLE001 — the weights are already saved; record the failure
        import traceback
        recipe["measurements"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        log(f"measurements failed: {type(e).__name__}: {e}")
    recipe["measure_seconds"] = time.perf_counter() - t
    recipe["wall_seconds"] = time.perf_counter() - start
    recipe["completed"] = "all"
    B.save_weights(comps, base_path, recipe=recipe)  # final recipe in the shipped file's metadata too
    write_recipe()
    log(f"done in {recipe['wall_seconds']:.0f}s; files in {out}: {sorted(p.name for p in out.iterdir())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``make demo`` (``python -m lyco.demo``): train an adapter offline on the CPU and show what it learned.

**With the pretrained world base** (``src/lyco/data/world/base.safetensors`` and the world
classifier, see :mod:`lyco.world`): a LoKr learns the *star* concept — a shape the base model has
never seen — behind the trigger word ``zkz`` from 16 captioned images, through the same runner as
``lyco eval`` (:func:`lyco.world.evaluate.evaluate`: lyco's trainer, the saved file loaded back,
DDIM samples on fixed prompts and seeds, the world classifier as the judge). It writes a grid with
the base model's samples (before) and the adapter's (after) and prints the scores before → after:
fidelity (the star appears for "a red zkz on a white background"), controllability (colour and
background still obeyed), preservation (prompts without the trigger unchanged) and quality.
About 2 minutes on 2 cores (measured: 100 s; fidelity 0 → 0.83, preservation 0.85).

**Without those weights** (a checkout where they have not been committed yet), the fallback:

1. writes the built-in tiny SD1 model as a diffusers folder (``demo_out/tiny-sd1``),
2. trains a LoKr on the shipped shapes dataset (``examples/data/tiny_shapes``, regenerated under
   ``demo_out/data`` when the repository copy is absent) with ``examples/train_lokr.toml``,
3. loads the saved adapter file back and draws a grid with and without it,
4. runs ``lyco inspect`` on it and prints where everything is.

That tiny model is randomly initialised (a structural stand-in for SD1, not a trained image
model), so its samples are not pictures of shapes; what it shows is the whole path — data, latent
cache, training, checkpoints, metadata, resume state, sampling, inspection — and that the loss on a
fixed evaluation batch goes down.

Environment: ``LYCO_DEMO_STEPS`` (default 150 with the world base, 80 otherwise), ``LYCO_DEMO_ALGO``
(world base: a ``lyco eval`` algorithm name, default ``lokr-1``), ``LYCO_DEMO_LR_SCALE`` (default 1),
``LYCO_DEMO_OUT`` (default ``demo_out``), ``LYCO_DEMO_THREADS`` (torch threads, default 1: the tiny
layers gain nothing from more, and on a busy machine a second thread's spin-waits cost more than
it gives), ``LYCO_DEMO_RANDOM=1`` forces the fallback.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_lokr.toml"
DATA = ROOT / "examples" / "data" / "tiny_shapes"


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if os.environ.get("LYCO_DEMO_RANDOM") != "1":
        from .world import base, classifier
        if base.is_pretrained() and classifier.is_trained():
            return world_demo()
        _say("(the pretrained world base is not in this checkout: showing the random tiny-model demo)")
    return random_model_demo()


def world_demo() -> int:
    """A LoKr learns the star concept from the pretrained world base; before/after grid and scores."""
    t0 = time.time()
    out = Path(os.environ.get("LYCO_DEMO_OUT", "demo_out")).resolve() / "world"
    steps = int(os.environ.get("LYCO_DEMO_STEPS", "150"))
    import torch
    torch.set_num_threads(int(os.environ.get("LYCO_DEMO_THREADS", "1")))
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    import warnings
    warnings.filterwarnings("ignore")
    from .world import evaluate as E
    from .world import scene

    concept = scene.CONCEPTS["star"]
    algo = E.ALGORITHMS[os.environ.get("LYCO_DEMO_ALGO", "lokr-1")]
    work = out / "work"
    if (work / "runs").exists():
        shutil.rmtree(work / "runs")  # a fresh adapter; the base folder, data and latent cache are kept
    # the demo's budget: 150 steps × batch 8 at the table's learning rate (the `lyco eval` table: 300 × 16);
    # measured on the 2-core CPU machine: LoKr f=-1 fidelity 0 → 0.83, preservation 0.85, 100 s in all
    s = E.Settings(steps=steps, batch_size=8, n_images=16, n_prompts=6, seeds=(0, 1), sample_steps=20,
                   lr_scale=float(os.environ.get("LYCO_DEMO_LR_SCALE", "1")), device="cpu", threads=int(os.environ.get("LYCO_DEMO_THREADS", "1")))
    _say(f"lyco demo: a {algo.label} learns the '{concept.name}' concept ({concept.description}) behind the "
         f"trigger word '{concept.trigger}'")
    _say(f"  from the pretrained world base, {steps} steps × batch {s.batch_size}, CPU, offline -> {out}/")
    res = E.evaluate(out, [algo.name], [concept.name], s, work=work, progress=True, say=_say)
    rows = {r["algo"]: r for r in res.results["rows"]}
    before, after = rows["base"], rows[algo.name]
    _say("")
    _say("=" * 72)
    head = "after (" + algo.label + ")"
    w = max(16, len(head) + 2)  # a column per side, wide enough for its heading (LoKr's label is long)
    _say(f"{'':>34}{'before (base)':>{w}}{head:>{w}}")
    for key, what in (("fidelity", f"fidelity: a star for '{concept.trigger}'"),
                      ("controllability", "controllability: colour+background"),
                      ("diversity", "diversity (Vendi, 1..2 seeds)"),
                      ("preservation", "preservation: no-trigger prompts"),
                      ("quality", "quality: classifier confidence")):
        _say(f"{what:<34}{before[key]:>{w}.2f}{after[key]:>{w}.2f}")
    _say(f"(fixed prompts and seeds: {len(s.seeds)} seeds × {s.n_prompts} trigger prompts, the same number without "
         f"the trigger; definitions in lyco/world/metrics.py)")
    _say(f"trained {after['steps']} steps in {after['train_s']:.1f}s; sampled from the saved file in "
         f"{after['sample_s']:.1f}s; whole demo {time.time() - t0:.1f}s")
    _say(f"before/after grid: {res.files[f'grid_{concept.name}']}")
    _say(f"scores:            {res.files['md']}")
    _say(f"adapter:           {work / 'runs' / f'{algo.name}_{concept.name}' / f'{algo.name}_{concept.name}.safetensors'}")
    _say(f"all algorithms:    lyco eval --device cuda   (or benchmarks/run_eval.sh on a GPU)")
    return 0


def random_model_demo() -> int:
    """The fallback: a LoKr on the random tiny SD1 model (the whole training path, not pictures)."""
    t0 = time.time()
    out = Path(os.environ.get("LYCO_DEMO_OUT", "demo_out")).resolve()
    steps = int(os.environ.get("LYCO_DEMO_STEPS", "80"))
    import torch
    torch.set_num_threads(int(os.environ.get("LYCO_DEMO_THREADS", "1")))
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings
    warnings.filterwarnings("ignore")

    from . import load
    from .cli import main as cli
    from .models.tiny import save_tiny, tiny_sd1_pipeline
    from .train import load_config
    from .train.loop import Trainer
    from .train.sample import make_scheduler, sample_grid
    from .train.synthetic import make_dataset

    _say(f"lyco demo: a LoKr on the tiny SD1 model, {steps} steps, CPU, offline -> {out}/")
    run = out / "run"
    if run.exists():
        shutil.rmtree(run)  # the latent cache (demo_out/cache) is kept: a second demo starts faster
    out.mkdir(parents=True, exist_ok=True)

    # 1. the base model as a diffusers folder
    model_dir = out / "tiny-sd1"
    if not (model_dir / "model_index.json").is_file():
        _say("[1/4] writing the tiny SD1 model as a diffusers folder")
        save_tiny(tiny_sd1_pipeline(seed=0), model_dir)
    else:
        _say("[1/4] tiny SD1 model already at " + str(model_dir))

    # 2. data and training
    data = DATA
    if not (data / "train").is_dir():
        data = out / "data"
        if not (data / "train").is_dir():
            make_dataset(data)
        _say(f"      (generated the shapes dataset under {data})")
    overrides = {
        "model": {"path": str(model_dir)},
        "data": {"train_dir": str(data / "train"), "cache_dir": str(out / "cache")},
        "train": {"max_train_steps": steps},
        "optimizer": {"learning_rate": 2e-3, "text_encoder_lr": 2e-4, "lr_warmup_steps": 8},
        "output": {"output_dir": str(run), "save_every_n_steps": max(1, steps // 2), "overwrite": True},
        "sample": {"steps": 12},
        "eval": {"every_n_steps": max(1, steps // 4)},
    }
    cfg = load_config(EXAMPLE if EXAMPLE.is_file() else None, overrides)
    _say(f"[2/4] training: algo={cfg.network.algo} rank={cfg.network.rank} factor="
         f"{cfg.network.options.get('factor')} preset={cfg.network.preset}, data {cfg.data.train_dir}")
    trainer = Trainer(cfg)
    res = trainer.train()
    trainer.close()
    t_train = res.seconds

    # 3. the file, loaded back, with and without
    _say("[3/4] sampling from the saved file, with and without the adapter")
    from .formats.checkpoint import load_pipeline
    pipe = load_pipeline(model_dir)
    adapter = load(res.adapter_path)
    net = adapter.attach(pipe)
    grid_path = run / "with_and_without.png"
    sample_grid(pipe, grid_path, cfg.sample.prompts, cfg.sample.seeds, network=net, compare_base=True,
                title=f"{Path(res.adapter_path).name}: base vs adapter", steps=cfg.sample.steps,
                guidance_scale=cfg.sample.guidance_scale, width=cfg.resolution[0], height=cfg.resolution[1],
                scheduler=make_scheduler(pipe, cfg.sample.sampler))
    net.detach()

    # 4. inspect
    _say(f"[4/4] lyco inspect {res.adapter_path} --no-modules")
    cli(["inspect", res.adapter_path, "--no-modules"])

    tl = [v for _, v in res.losses]
    k = max(1, len(tl) // 10)
    ev = res.eval_losses
    _say("")
    _say("=" * 72)
    _say(f"trained {res.steps} steps in {t_train:.1f}s; whole demo {time.time() - t0:.1f}s")
    _say(f"fixed-batch eval loss (same images, noise, timesteps): {ev[0][1]:.4f} -> {ev[-1][1]:.4f} "
         f"({100 * (ev[-1][1] / ev[0][1] - 1):+.1f}%)")
    _say("  eval loss by step: " + ", ".join(f"{s}: {v:.4f}" for s, v in ev))
    _say(f"training loss, mean of the first/last {k} steps: {sum(tl[:k]) / k:.4f} -> {sum(tl[-k:]) / k:.4f}")
    _say(f"adapter:          {res.adapter_path}")
    _say(f"checkpoints:      {', '.join(Path(p).name for p in res.checkpoints[:-1]) or '-'}")
    _say(f"resumable states: {', '.join(Path(p).name for p in res.states)}")
    _say(f"config used:      {trainer.config_path}")
    _say(f"to continue:      lyco train {trainer.config_path} --resume {run} --max-train-steps {2 * steps}")
    _say(f"sample grids:     {', '.join(Path(p).name for p in res.sample_grids)}")
    _say(f"with/without:     {grid_path}")
    _say(f"loss curve:       {res.loss_curve}")
    _say(f"TensorBoard logs: {cfg.logging_dir}" if trainer.log_with == "tensorboard" else "TensorBoard: not installed")
    _say(f"latent cache:     {cfg.cache_dir}")
    _say("note: the tiny model is random (a structural stand-in), so samples are not pictures of shapes.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

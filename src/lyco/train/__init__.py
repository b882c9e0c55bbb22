"""Training adapters on Stable Diffusion (SD1/SD2/SDXL) with accelerate.

    from lyco.train import load_config, train
    cfg = load_config("examples/train_lokr.toml", {"train": {"max_train_steps": 100}})
    result = train(cfg)            # TrainResult: adapter_path, losses, eval_losses, checkpoints, …

Command line: ``lyco train CONFIG.toml [--flags]`` (every config key is a flag),
``lyco train CONFIG.toml --resume OUTPUT_DIR_OR_STATE``, and for several processes
``accelerate launch -m lyco train CONFIG.toml``.

Modules: :mod:`~lyco.train.config` (TOML → validated dataclasses), :mod:`~lyco.train.data`
(folders, captions, buckets, latent cache), :mod:`~lyco.train.loop` (the trainer),
:mod:`~lyco.train.sample` (sample grids), :mod:`~lyco.train.synthetic` (the shapes dataset).
"""

from __future__ import annotations

from .config import Config, from_dict, load as load_config  # noqa: F401


def train(cfg, **kw):
    """Train as ``cfg`` (a :class:`Config`) says; returns a :class:`~lyco.train.loop.TrainResult`."""
    from .loop import train as _train
    return _train(cfg, **kw)


def __getattr__(name):  # lazy: the trainer imports diffusers/accelerate
    if name in ("Trainer", "TrainResult", "TrainingError"):
        from . import loop
        return getattr(loop, name)
    raise AttributeError(name)


__all__ = ["Config", "from_dict", "load_config", "train", "Trainer", "TrainResult", "TrainingError"]

"""lyco: LyCORIS adapters for any torch model, interchangeable with the tools people use.

    import lyco
    net = lyco.create(model_or_components, algo="lokr", rank=8, alpha=4, preset="full")
    net.save("out.safetensors", dtype="fp16")
    adapter = lyco.load("file.safetensors")
    handle = adapter.attach(model_or_components, multiplier=0.8); handle.detach()
    adapter.merge_into(model_or_components, multiplier=0.8)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .adapter import Adapter, ModuleAdapter  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError, FamilyMismatch, FormatError, LycoError, ShapeMismatch, UnknownKeys, UnsafeFile,
)
from .network import Network  # noqa: E402


def create(model_or_components, algo: str = "lora", rank: int = 4, alpha: float | None = None, *,
           preset=None, **options) -> Network:
    """Attach a fresh, trainable adapter to a model and return the :class:`Network`.

    ``model_or_components``: an ``nn.Module`` (generic ``lycoris_`` naming), a dict with keys
    ``unet``/``text_encoder``/``text_encoder_2``, or a diffusers pipeline. ``preset``: a built-in
    name (``attn-only``, ``attn-mlp``, ``full``, ``full-lin``, ``unet-only``,
    ``unet-transformer-only``, ``unet-convblock-only``, ``ia3``), a TOML file or a dict.
    Other options: ``conv_rank``, ``conv_alpha``, ``overrides``, ``dora``, ``dora_axis``,
    ``multiplier``, ``seed`` and every algorithm option (``factor``, ``use_tucker``, ...).
    ``dora_detach_norm=True`` (with ``dora=True``): treat DoRA's weight norm as a constant in
    backward (DoRA paper §4.3, PEFT's default): same output, cheaper backward; off by default.
    ``mode``: the training path of every layer — ``"auto"`` (default: DoRA, (IA)³, GLoRA, BOFT, Full and LoKr
    train on ``op(x, W′)`` keeping only x for backward, the others add their delta to the frozen
    output; measured choices, see benchmarks/NOTES.md), ``"bypass"`` (always the delta) or
    ``"rebuild"`` (always ``op(x, W′)``). Same function either way.
    """
    return Network.create(model_or_components, algo=algo, rank=rank, alpha=alpha, preset=preset, **options)


def load(path, *, family: str | None = None, check_finite: bool = True,
         oft_convention: str | None = None) -> Adapter:
    """Read an adapter file (LyCORIS/kohya, diffusers/PEFT; safetensors, or legacy .pt/.ckpt through
    ``torch.load(weights_only=True)`` only). NaN/Inf tensors are refused unless ``check_finite=False``."""
    from .formats import kohya
    return kohya.load(path, family=family, check_finite=check_finite, oft_convention=oft_convention)


__all__ = ["Adapter", "ModuleAdapter", "Network", "create", "load", "ConfigError", "FamilyMismatch",
           "FormatError", "LycoError", "ShapeMismatch", "UnknownKeys", "UnsafeFile", "__version__"]

"""The one object in the middle of everything: an Adapter.

An :class:`Adapter` maps a canonical module name (``"<component>.<dotted path>"``, e.g.
``unet.down_blocks.0.attentions.0.proj_in`` or ``text_encoder.text_model.encoder.layers.0.mlp.fc1``;
component ``model`` for a generic torch module) to one algorithm and its tensors (named with
the LyCORIS/kohya suffixes), plus the file's metadata. Files decode into one, training produces
one, every tool consumes one.

A module path read from a file may still be in its flattened form (``down_blocks_0_…``) when the
model family was not recognised; resolution against a real model always goes through
``naming.flatten`` so both forms attach the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch

from . import algorithms
from .algorithms.base import Algorithm
from .errors import FormatError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "model")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def split_name(name: str) -> tuple[str, str]:
    comp, _, path = name.partition(".")
    return comp, path


@dataclass
class ModuleAdapter:
    """One adapted layer: the algorithm name and its tensors (file suffix names)."""

    algo: str
    tensors: dict[str, torch.Tensor]
    #: how to read an ambiguous file convention; today only the OFT/BOFT constraint:
    #: "lycoris" (κ = alpha·out, default) or "comfyui" (κ = alpha)
    convention: str | None = None

    @property
    def algorithm(self) -> Algorithm:
        alg = algorithms.get_for(self.algo, self.tensors)
        if self.convention and hasattr(alg, "with_convention"):
            alg = alg.with_convention(self.convention)
        return alg

    @property
    def is_dora(self) -> bool:
        return "dora_scale" in self.tensors

    def to(self, dtype: torch.dtype | None = None, device=None) -> "ModuleAdapter":
        out = {}
        for k, v in self.tensors.items():
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            if device is not None:
                v = v.to(device)
            out[k] = v
        return ModuleAdapter(self.algo, out, self.convention)


@dataclass
class Adapter:
    modules: dict[str, ModuleAdapter] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    family: str | None = None        # "sd1", "sd2", "sdxl" or None (generic / unknown)
    source: str | None = None        # the file it was read from, for messages
    create_args: dict[str, Any] = field(default_factory=dict)  # how it was made (for ss_* metadata)

    @property
    def two_text_encoders(self) -> bool:
        return self.family == "sdxl" or "text_encoder_2" in self.components()

    # -- container helpers -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def items(self):
        return self.modules.items()

    def components(self) -> set[str]:
        return {split_name(n)[0] for n in self.modules}

    def algos(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.modules.values():
            key = m.algo + ("+dora" if m.is_dora else "")
            out[key] = out.get(key, 0) + 1
        return out

    def num_params(self) -> int:
        return sum(int(t.numel()) for m in self.modules.values() for k, t in m.tensors.items()
                   if k not in ("alpha", "on_input"))

    def to(self, dtype=None, device=None) -> "Adapter":
        return Adapter({n: m.to(dtype, device) for n, m in self.modules.items()}, dict(self.metadata),
                       self.family, self.source, dict(self.create_args))

    def subset(self, components) -> "Adapter":
        comps = set(components)
        return Adapter({n: m for n, m in self.modules.items() if split_name(n)[0] in comps},
                       dict(self.metadata), self.family, self.source, dict(self.create_args))

    # -- checks --------------------------------------------------------------------------
    def check_finite(self) -> None:
        """Refuse NaN/Inf tensors. ``alpha`` may be ±Inf only where the algorithm ignores it (a
        full/full LoKr, Full, IA3…: its scale stays finite); a NaN alpha is always refused."""
        for name, m in self.modules.items():
            for k, t in m.tensors.items():
                if not t.is_floating_point():
                    continue
                if t.element_size() == 1 or t.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                            torch.float64):
                    t = t.float()  # fp8 files: torch has no isfinite/isnan for float8 dtypes
                if k == "alpha":
                    if bool(torch.isnan(t).any()):
                        raise FormatError(f"module {name!r}: tensor 'alpha' is NaN", file=self.source)
                    if bool(torch.isfinite(t).all()):
                        continue
                    # an infinite alpha is harmless only where the algorithm ignores alpha: its scale
                    # is the same for any alpha (other loaders compute alpha/rank = inf elsewhere)
                    try:
                        alg = m.algorithm
                        probe = dict(m.tensors, alpha=torch.tensor(1.2345))
                        ignored = float(alg.scale(m.tensors)) == float(alg.scale(probe))
                    except Exception:  # noqa: BLE001 — a scale that cannot be computed is not ignored
                        ignored = False
                    if not ignored:
                        raise FormatError(f"module {name!r}: tensor 'alpha' is infinite (the {m.algo} scale "
                                          f"alpha/rank would be infinite in other loaders)", file=self.source)
                    continue
                if not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise FormatError(f"module {name!r}: tensor {k!r} contains NaN or Inf values "
                                      f"({bad} of {t.numel()})", file=self.source)

    # -- delegation to the rest of the system ------------------------------------------
    def attach(self, target, multiplier: float = 1.0, te_multiplier: float | None = None, *,
               strict: bool = True, trainable: bool = False, name: str | None = None,
               mode: str = "auto", family: str | None = None):
        """Attach on the fly (bypass): returns a :class:`lyco.network.Network`; ``.detach()`` removes it.

        An adapter whose family (sd1/sd2/sdxl) is known and differs from the model's raises
        :class:`~lyco.errors.FamilyMismatch` before anything is touched; ``family=`` (the family to
        assume) or ``strict=False`` skips that check."""
        from .network import Network
        return Network.from_adapter(self, target, multiplier=multiplier, te_multiplier=te_multiplier,
                                    strict=strict, trainable=trainable, name=name, mode=mode,
                                    family=family)

    def merge_into(self, target, multiplier: float = 1.0, te_multiplier: float | None = None, *,
                   strict: bool = True, family: str | None = None) -> list[str]:
        """Bake into the weights (fp32 math, one cast). Returns the unmatched module names.
        ``family=``/``strict=False`` skip the up-front family check (see ``attach``)."""
        from .network import merge_adapter_into
        return merge_adapter_into(self, target, multiplier=multiplier, te_multiplier=te_multiplier,
                                  strict=strict, family=family)

    def save(self, path, dtype: str | torch.dtype | None = None, metadata: Mapping[str, Any] | None = None,
             **kw) -> None:
        from .formats import kohya
        kohya.save(self, path, dtype=dtype, metadata=metadata, **kw)

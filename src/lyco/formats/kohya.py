"""LyCORIS / kohya safetensors files: ``<prefix>_<flattened module>.<tensor suffix>``.

Reading: every algorithm (detected per module from its tensor names and shapes), both UNet
naming styles (diffusers and LDM/SGM; a file mixing them is refused), ``lora_te_`` /
``lora_te1_`` / ``lora_te2_`` / ``lycoris_`` prefixes, 0-d or (1,) alphas, a missing alpha
(= rank), legacy ``.pt``/``.ckpt`` through ``torch.load(weights_only=True)`` only, and
diffusers/PEFT LoRA files (delegated to :mod:`lyco.formats.peft`). ``bundle_emb.*`` textual
inversion embeddings are kept aside in ``adapter.extras`` (not applied).

Writing: SD1/SD2 UNets with diffusers names, SDXL with LDM names (what kohya writes and every
loader reads; ``naming="diffusers"|"ldm"`` overrides), alpha as a 0-d tensor, the requested
dtype, kohya's minimum ``ss_*`` keys, ``modelspec.*``, ``sshs_*`` hashes and our own ``lyco_*``
keys recording ambiguous choices. Written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import algorithms, naming
from ..adapter import Adapter, ModuleAdapter
from ..errors import ConfigError, FormatError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

#: suffixes some tools add that carry nothing lyco applies (kept out of the algorithm check)
_IGNORED_SUFFIXES = {"bias_indices", "bias_values", "bias_size"}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    return DTYPES[key]


# --------------------------------------------------------------------------------------
# family detection from a file
# --------------------------------------------------------------------------------------


def _in_dim(t: Mapping[str, torch.Tensor]) -> int | None:
    for k, ax in (("lora_down.weight", 1), ("hada_w1_b", 1), ("diff", 1), ("a2.weight", 1)):
        if k in t and t[k].dim() >= 2:
            return int(t[k].shape[ax])
    if "lokr_w1" in t or "lokr_w1_b" in t:
        w1 = t.get("lokr_w1")
        w1 = w1 if w1 is not None else t["lokr_w1_b"]
        w2 = t.get("lokr_w2")
        if w2 is None and "lokr_t2" in t:
            w2 = t.get("lokr_w2_b")
        if w2 is None or w1.dim() < 2 or w2.dim() < 2:
            return None  # flattened conv layout (in_n·∏k), or tensors the decoder will refuse
        return int(w1.shape[1] * w2.shape[1])
    return None


def detect_family(modules: Mapping[tuple[str, str], Mapping[str, torch.Tensor]]) -> str | None:
    """sd1 / sd2 / sdxl from prefixes, UNet naming and cross-attention key widths; None if unknown."""
    comps = {c for c, _ in modules}
    if "text_encoder_2" in comps:
        return "sdxl"
    ctx = None
    for (comp, flat), t in modules.items():
        if comp == "unet" and flat.endswith(("attn2_to_k", "attn2_to_v")):
            ctx = _in_dim(t)
            if ctx:
                break
    if ctx is not None:
        return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(ctx)
    for (comp, flat), t in modules.items():
        if comp == "text_encoder" and flat.endswith("self_attn_q_proj"):
            d = _in_dim(t)
            if d:
                return {768: "sd1", 1024: "sd2"}.get(d)
    for comp, flat in modules:
        if comp == "unet" and flat.startswith(("label_emb", "add_embedding")):
            return "sdxl"
    if "unet" in comps or "text_encoder" in comps:
        return None
    return None


def _structural_layout(family: str | None, flats) -> naming.UNetLayout:
    if family == "sdxl":
        return naming.SDXL_LAYOUT
    if family in ("sd1", "sd2"):
        return naming.SD1_LAYOUT
    # unknown family: SDXL-like if there are no input_blocks 1/2 attentions (SDXL's first block has none)
    if any(f.startswith(("input_blocks_1_1_", "input_blocks_2_1_")) for f in flats):
        return naming.SD1_LAYOUT
    if any(f.startswith(("input_blocks_4_1_", "input_blocks_7_1_")) for f in flats):
        return naming.SDXL_LAYOUT
    return naming.SD1_LAYOUT


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


def read_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from . import safetensors_io
    p = str(path)
    if not os.path.exists(p):
        raise FormatError("no such file", file=p)
    if p.endswith((".pt", ".ckpt", ".bin", ".pth")):
        sd = safetensors_io.load_legacy(p)
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise FormatError("legacy file does not hold a flat {name: tensor} state dict", file=p)
        return dict(sd), {}
    return safetensors_io.load_tensors(p)


def load(path, *, family: str | None = None, check_finite: bool = True,
         oft_convention: str | None = None) -> Adapter:
    """Read a file. ``oft_convention`` ("lycoris" κ=alpha·out, the default, or "comfyui" κ=alpha)
    chooses how an OFT/BOFT constraint stored in ``alpha`` is read; files written by lyco have
    the constraint baked into the blocks, so both conventions give the same result for them."""
    tensors, metadata = read_file(path)
    a = from_state_dict(tensors, metadata, source=str(path), family=family, check_finite=check_finite)
    conv = oft_convention or metadata.get("lyco_oft_constraint")
    if conv in ("lycoris", "comfyui"):
        for m in a.modules.values():
            if m.algo in ("diag-oft", "boft"):
                m.convention = conv
    elif conv is not None:
        raise ConfigError(f"oft_convention must be 'lycoris' or 'comfyui', got {conv!r}")
    return a


def from_state_dict(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
                    source: str | None = None, family: str | None = None, check_finite: bool = True) -> Adapter:
    metadata = dict(metadata or {})
    from . import peft
    if tensors and peft.is_peft_state_dict(tensors.keys()):
        a = peft.from_peft(dict(tensors), metadata, source=source)
        a.source = source
        for name, m in a.modules.items():
            check_module_tensors(name, m.algorithm, m.tensors, source)
        if check_finite:
            a.check_finite()
        return a
    if not tensors:
        raise FormatError("the file holds no tensors", file=source)
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.startswith("bundle_emb."):
            extras[key] = t
            continue
        comp, flat, suffix = naming.parse_key(key, file=source)
        if suffix in _IGNORED_SUFFIXES:
            continue
        grouped.setdefault((comp, flat), {})[suffix] = t
    meta_fam = metadata.get("lyco_family")
    if meta_fam not in (None, "sd1", "sd2", "sdxl"):
        meta_fam = None  # header data, not trusted: an unknown family is detected from the tensors
    fam = family or meta_fam or detect_family(grouped)
    unet_flats = [f for c, f in grouped if c == "unet"]
    styles = {naming.unet_style(f) for f in unet_flats} - {None}
    if len(styles) > 1:
        ldm = [f for f in unet_flats if naming.unet_style(f) == "ldm"][:3]
        dif = [f for f in unet_flats if naming.unet_style(f) == "diffusers"][:3]
        raise FormatError(f"mixes UNet naming styles (LDM e.g. {ldm}, diffusers e.g. {dif}); "
                          "a file must use one style", file=source)
    layout = _structural_layout(fam, unet_flats)
    modules: dict[str, ModuleAdapter] = {}
    for (comp, flat), t in grouped.items():
        mod_key = f"{naming.component_prefix(comp, comp == 'text_encoder_2')}_{flat}"
        try:
            t = _normalise(t)
        except FormatError as e:
            raise FormatError(f"module {mod_key!r}: {e}", file=source) from None
        alg = algorithms.detect_for(t)
        if alg is None:
            raise FormatError(f"module {mod_key!r}: tensors {sorted(t)} match no known algorithm "
                              f"(LoRA, LoHa, LoKr, IA3, Full, Norm, OFT/BOFT, GLoRA)", file=source)
        unknown = set(t) - set(alg.keys) - {"dora_scale"}
        if unknown:
            raise FormatError(f"module {mod_key!r}: unexpected tensor(s) {sorted(unknown)} for algorithm "
                              f"{alg.name!r} (expected some of {sorted(alg.keys)})", file=source)
        check_module_tensors(mod_key, alg, t, source)
        if comp == "unet" and naming.unet_style(flat) == "ldm":
            flat = naming.unet_flat_from_ldm(flat, layout)
        elif comp in (naming.TE, naming.TE2):
            flat = naming.text_flat_canonical(flat)  # transformers-5 names lack ``text_model_``
        # SD components get their dots back (exact for SD UNets/CLIP); generic modules stay flat
        # (resolution against a model compares flattened strings, so both forms attach alike)
        path = naming.dot_path(flat) if comp != "model" else flat
        name = f"{comp}.{path}"
        if name in modules:
            raise FormatError(f"module {mod_key!r} appears twice (under two names)", file=source)
        modules[name] = ModuleAdapter(getattr(alg, "inner", alg).name, t)
    a = Adapter(modules, metadata, fam, source)
    a.extras = extras  # type: ignore[attr-defined]
    if check_finite:
        a.check_finite()
    return a


#: tensors that may be integers/booleans (flags); every other adapter tensor must be floating point
_FLAG_TENSORS = {"on_input"}
#: (min, max) number of dimensions of each known tensor (1-D … 5-D: Linear, Conv1d/2d/3d, norms)
_NDIM = {
    "lora_up.weight": (2, 5), "lora_down.weight": (2, 5), "lora_mid.weight": (3, 5),
    "hada_w1_a": (2, 2), "hada_w1_b": (2, 2), "hada_w2_a": (2, 2), "hada_w2_b": (2, 2),
    "hada_t1": (3, 5), "hada_t2": (3, 5),
    "lokr_w1": (2, 2), "lokr_w1_a": (2, 2), "lokr_w1_b": (2, 2), "lokr_w2": (2, 5),
    "lokr_w2_a": (2, 2), "lokr_w2_b": (2, 2), "lokr_t2": (3, 5),
    "diff": (1, 5), "diff_b": (1, 1), "w_norm": (1, 1), "b_norm": (1, 1), "oft_blocks": (3, 4),
    "a1.weight": (2, 5), "a2.weight": (2, 5), "b1.weight": (2, 5), "b2.weight": (2, 5), "dora_scale": (1, 5),
}


def check_module_tensors(mod_key: str, alg, t: Mapping[str, torch.Tensor], source: str | None) -> None:
    """Refuse a module whose tensors cannot be what the detected algorithm reads: non-float factors,
    or shapes that do not fit together (rank, scale, layout). Cheap (shape reads only), so every
    tool gets a consistent module or a :class:`FormatError` naming it, not a crash later."""
    for k, v in t.items():
        if k not in _FLAG_TENSORS and not v.is_floating_point():
            raise FormatError(f"module {mod_key!r}: tensor {k!r} has dtype {str(v.dtype).replace('torch.', '')}; "
                              f"expected a floating-point tensor", file=source)
        lo, hi = _NDIM.get(k, (0, 8))
        if not lo <= v.dim() <= hi:
            want = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise FormatError(f"module {mod_key!r}: tensor {k!r} has shape {tuple(v.shape)} ({v.dim()}-D); "
                              f"expected {want} dimensions", file=source)
    try:
        alg.rank(t)
        alg.scale(t)
        alg.describe(t)
        alg.infer_weight_shape(t)
    except FormatError:
        raise
    except Exception as e:  # noqa: BLE001 — inconsistent shapes surface as any of many errors
        shapes = {k: tuple(v.shape) for k, v in t.items()}
        raise FormatError(f"module {mod_key!r}: {alg.name} tensors {shapes} do not fit together "
                          f"({type(e).__name__}: {str(e)[:200]})", file=source) from None


def _normalise(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(t)
    a = out.get("alpha")
    if a is not None:
        if a.numel() != 1:
            raise FormatError(f"alpha must hold one value, found shape {tuple(a.shape)}")
        out["alpha"] = a.reshape(()).float()
    oi = out.get("on_input")
    if oi is not None:
        if oi.numel() != 1:
            raise FormatError(f"on_input must hold one value, found shape {tuple(oi.shape)}")
        out["on_input"] = oi.reshape(())
    up, down = out.get("lora_up.weight"), out.get("lora_down.weight")
    if up is not None and down is not None and up.dim() == 2 and down.dim() > 2:
        # LyCORIS DyLoRA writes a conv layer's up factor 2-D (out, r); everyone else (and lyco)
        # writes the 1×1-conv layout (out, r, 1, …). Same numbers, so read it as the usual layout.
        out["lora_up.weight"] = up.reshape(tuple(up.shape) + (1,) * (down.dim() - 2))
    return out


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------


def to_state_dict(adapter: Adapter, dtype=None, naming_style: str = "auto") -> dict[str, torch.Tensor]:
    dt = parse_dtype(dtype)
    two_te = adapter.two_text_encoders
    if naming_style == "auto":
        naming_style = "ldm" if adapter.family == "sdxl" else "diffusers"
    if naming_style not in ("diffusers", "ldm"):
        raise ConfigError(f"naming must be 'diffusers' or 'ldm', got {naming_style!r}")
    layout = naming.SDXL_LAYOUT if adapter.family == "sdxl" else naming.SD1_LAYOUT
    out: dict[str, torch.Tensor] = {}
    for name, ma in adapter.modules.items():
        key = naming.file_module_key(name, two_text_encoders=two_te, unet_style=naming_style, layout=layout)
        alg = ma.algorithm
        tensors = alg.export(ma.tensors) if not getattr(ma, "exported", False) else ma.tensors
        for suffix, t in tensors.items():
            t = t.detach().to("cpu")
            if suffix == "alpha":
                t = t.reshape(()).float()
            if dt is not None and t.is_floating_point():
                t = t.to(dt)
            k = f"{key}.{suffix}"
            if k in out:
                raise FormatError(f"two modules map to the same file key {k!r}")
            out[k] = t.contiguous()
    return out


def save(adapter: Adapter, path, dtype=None, metadata: Mapping[str, Any] | None = None, *,
         naming: str = "auto", overwrite: bool = False, hashes: bool = True) -> None:
    from . import metadata as md_mod, safetensors_io
    sd = to_state_dict(adapter, dtype, naming)
    md = md_mod.adapter_metadata(adapter, sd)
    md.update({k: str(v) for k, v in (metadata or {}).items()})
    if hashes:
        mh, lh = md_mod.precalculate_hashes(sd, md)
        md["sshs_model_hash"], md["sshs_legacy_hash"] = mh, lh
    safetensors_io.save_tensors(sd, str(path), md, overwrite=overwrite)

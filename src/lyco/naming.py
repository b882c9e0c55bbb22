"""Names are data: canonical module names ↔ the ecosystem's file keys.

Canonical names inside lyco are ``"<component>.<path>"``:
  * UNet paths use **diffusers** names (``down_blocks.1.attentions.0.proj_in``);
  * text-encoder paths always include ``text_model.`` (``text_model.encoder.layers.0.mlp.fc1``),
    whether or not the installed transformers nests the model under ``text_model`` (transformers 5
    does not);
  * a path may be held in its flattened form (``down_blocks_1_attentions_0_proj_in``) when no
    model or family table was at hand to restore the dots: resolution always compares
    flattened strings, so both forms behave the same.

Files use ``<prefix>_<flattened path>.<tensor suffix>`` (kohya/LyCORIS). Prefixes:
``lora_unet`` (UNet), ``lora_te`` (the single text encoder of SD1/SD2), ``lora_te1``/``lora_te2``
(SDXL's two encoders), ``lycoris`` (any other torch model). SD1/SD2 UNet keys are written with
diffusers names, SDXL UNet keys with LDM/SGM names (what kohya writes and every loader reads);
both styles are read, and one file never mixes them.

Only this module and ``lyco.formats`` know these strings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import torch.nn as nn

from .algorithms.base import layer_kind
from .errors import ConfigError, FormatError, UnknownKeys

UNET, TE, TE2, MODEL = "unet", "text_encoder", "text_encoder_2", "model"

# file prefix → component (longest first so lora_te1 wins over lora_te)
_PREFIX_TO_COMPONENT = [
    ("lora_unet_", UNET),
    ("lora_te1_", TE),
    ("lora_te2_", TE2),
    ("lora_te_", TE),
    ("lycoris_", MODEL),
]

TE_CLASS_PREFIX = "text_model."


def flatten(path: str) -> str:
    return path.replace(".", "_")


def component_prefix(component: str, two_text_encoders: bool = False) -> str:
    if component == UNET:
        return "lora_unet"
    if component == TE:
        return "lora_te1" if two_text_encoders else "lora_te"
    if component == TE2:
        return "lora_te2"
    if component == MODEL:
        return "lycoris"
    raise ValueError(f"unknown component {component!r}")


def parse_key(key: str, file: str | None = None) -> tuple[str, str, str]:
    """``lora_unet_down_blocks_0_x.lora_up.weight`` → ("unet", "down_blocks_0_x", "lora_up.weight")."""
    module, dot, suffix = key.partition(".")
    if not dot:
        raise FormatError("not a '<module>.<tensor>' key", file=file, key=key)
    for prefix, comp in _PREFIX_TO_COMPONENT:
        if module.startswith(prefix):
            return comp, module[len(prefix):], suffix
    raise FormatError("unknown module prefix (expected lora_unet_, lora_te_, lora_te1_, lora_te2_ or lycoris_)",
                      file=file, key=key)


def file_module_key(name: str, *, two_text_encoders: bool = False, unet_style: str = "diffusers",
                    layout: "UNetLayout | None" = None) -> str:
    """Canonical name → the file's module key (no tensor suffix)."""
    comp, _, path = name.partition(".")
    flat = flatten(path)
    if comp == UNET and unet_style == "ldm":
        flat = unet_flat_to_ldm(flat, layout or SDXL_LAYOUT)
    return f"{component_prefix(comp, two_text_encoders)}_{flat}"


# --------------------------------------------------------------------------------------
# UNet: diffusers ↔ LDM/SGM block names — the one table, for dotted and flattened names
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetLayout:
    """What the diffusers↔LDM UNet numbering depends on: which down/up blocks hold attentions,
    resnets per block, and whether the mid block has an attention."""

    down_attn: tuple[bool, ...]
    up_attn: tuple[bool, ...]
    layers_per_block: int = 2
    mid_attn: bool = True

    @property
    def stride(self) -> int:
        return self.layers_per_block + 1


SD1_LAYOUT = UNetLayout((True, True, True, False), (False, True, True, True))   # SD1.x and SD2.x
SDXL_LAYOUT = UNetLayout((False, True, True), (True, True, False))


def _has_attn(block_type) -> bool:
    return "CrossAttn" in str(block_type) or str(block_type).startswith("Attn")


def _layout_from_modules(unet: nn.Module) -> UNetLayout:
    """Layout of a UNet-shaped module without a diffusers config, from its module names."""
    names = [n for n, _ in unet.named_modules()]

    def count(pattern: str) -> int:
        return 1 + max([int(m[1]) for n in names if (m := re.fullmatch(pattern, n))], default=-1)

    n_down, n_up = count(r"down_blocks\.(\d+)"), count(r"up_blocks\.(\d+)")
    down = tuple(f"down_blocks.{i}.attentions" in names for i in range(n_down))
    up = tuple(f"up_blocks.{i}.attentions" in names for i in range(n_up))
    lpb = count(r"down_blocks\.0\.resnets\.(\d+)") or 2
    return UNetLayout(down, up, lpb, "mid_block.attentions" in names)


def unet_layout(unet_or_config) -> UNetLayout:
    """Layout of a ``UNet2DConditionModel`` (or any module with diffusers UNet names), its config
    (dict/FrozenDict), a family name ("sd1", "sd2", "sdxl") or an existing :class:`UNetLayout`.
    Raises :class:`ConfigError` for a UNet with no LDM equivalent (per-block ``layers_per_block``)."""
    if isinstance(unet_or_config, UNetLayout):
        return unet_or_config
    cfg = unet_or_config
    if isinstance(cfg, str):
        from .models.configs import get_config

        cfg = get_config(cfg, "unet")
    elif not isinstance(cfg, Mapping):
        cfg = getattr(unet_or_config, "config", None)
        if not (isinstance(cfg, Mapping) and "down_block_types" in cfg):
            if isinstance(unet_or_config, nn.Module):
                return _layout_from_modules(unet_or_config)
            raise ConfigError(f"cannot derive a UNet layout from {type(unet_or_config).__name__}")
    lpb = cfg.get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise ConfigError(f"per-block layers_per_block {list(lpb)} has no LDM equivalent")
        lpb = lpb[0]
    mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    return UNetLayout(tuple(_has_attn(t) for t in cfg["down_block_types"]),
                      tuple(_has_attn(t) for t in cfg["up_block_types"]),
                      int(lpb), mid_type is not None and "CrossAttn" in str(mid_type))


# sub-module names written with dots; the flattened tables are derived per separator
_RESNET_D2L = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_TOP_D2L = (("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
            ("time_embedding.linear_2", "time_embed.2"), ("add_embedding.linear_1", "label_emb.0.0"),
            ("add_embedding.linear_2", "label_emb.0.2"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"))


@dataclass(frozen=True)
class _Grammar:
    """The block patterns and sub-name tables for one separator ("." dotted, "_" flattened)."""

    sep: str
    down: re.Pattern
    mid: re.Pattern
    up: re.Pattern
    inp: re.Pattern
    middle: re.Pattern
    out: re.Pattern
    resnet: tuple
    top: tuple

    def join(self, *parts) -> str | None:
        """Parts joined by the separator, empty ones left out; None if any part is None."""
        if any(p is None for p in parts):
            return None
        return self.sep.join(str(p) for p in parts if p != "")

    def swap(self, path: str, table, reverse: bool = False) -> str | None:
        """Replace the first table prefix that ``path`` starts with (whole name parts only)."""
        for d, l in table:
            src, dst = (l, d) if reverse else (d, l)
            if path == src or path.startswith(src + self.sep):
                return dst + path[len(src):]
        return None

    def after(self, rest: str, head: str) -> str | None:
        """``rest`` without its first name part ``head`` ("" when that is all), else None."""
        if rest == head:
            return ""
        return rest[len(head) + 1:] if rest.startswith(head + self.sep) else None


@lru_cache(maxsize=2)
def _grammar(sep: str) -> _Grammar:
    s, tail = re.escape(sep), rf"(?:{re.escape(sep)}(.+))?"

    def table(t):
        return tuple((d.replace(".", sep), l.replace(".", sep)) for d, l in t)

    return _Grammar(
        sep,
        down=re.compile(rf"down_blocks{s}(\d+){s}(resnets|attentions|downsamplers){s}(\d+){tail}"),
        mid=re.compile(rf"mid_block{s}(resnets|attentions){s}(\d+){tail}"),
        up=re.compile(rf"up_blocks{s}(\d+){s}(resnets|attentions|upsamplers){s}(\d+){tail}"),
        inp=re.compile(rf"input_blocks{s}(\d+){s}(\d+){tail}"),
        middle=re.compile(rf"middle_block{s}(\d+){tail}"),
        out=re.compile(rf"output_blocks{s}(\d+){s}(\d+){tail}"),
        resnet=table(_RESNET_D2L), top=table(_TOP_D2L))


# Strict mapping (dotted names of a checkpoint) refuses a block the layout does not have; lenient
# mapping (flattened adapter-file keys, mapped with a family's layout when no model is at hand)
# numbers blocks by arithmetic alone and keeps an unknown resnet sub-name as it is.

def _to_ldm(path: str, lay: UNetLayout, sep: str, strict: bool) -> str | None:
    g = _grammar(sep)
    top = g.swap(path, g.top)
    if top is not None:
        return top
    S, L = lay.stride, lay.layers_per_block

    def res(rest: str) -> str | None:
        if not rest:
            return ""
        new = g.swap(rest, g.resnet)
        return new if new is not None else (None if strict else rest)

    if m := g.down.fullmatch(path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        nd = len(lay.down_attn)
        if strict and i >= nd:
            return None
        n = 1 + i * S + j
        if kind == "resnets" and (j < L or not strict):
            return g.join("input_blocks", n, 0, res(rest))
        if kind == "attentions" and (not strict or (j < L and lay.down_attn[i])):
            return g.join("input_blocks", n, 1, rest)
        if kind == "downsamplers" and j == 0 and (i < nd - 1 or not strict):
            conv = g.after(rest, "conv") if rest else ""
            return g.join("input_blocks", (i + 1) * S, 0, "op" if rest else "", conv)
        return None
    if m := g.mid.fullmatch(path):
        kind, j, rest = m[1], int(m[2]), m[3] or ""
        if kind == "resnets" and (j < 2 or not strict):
            return g.join("middle_block", 2 * j if lay.mid_attn else j, res(rest))
        if kind == "attentions" and j == 0 and (lay.mid_attn or not strict):
            return g.join("middle_block", 1, rest)
        return None
    if m := g.up.fullmatch(path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        nu = len(lay.up_attn)
        if strict and i >= nu:
            return None
        attn = i < nu and lay.up_attn[i]
        if kind == "resnets" and (j <= L or not strict):
            return g.join("output_blocks", i * S + j, 0, res(rest))
        if kind == "attentions" and (not strict or (j <= L and attn)):
            return g.join("output_blocks", i * S + j, 1, rest)
        if (kind == "upsamplers" and j == 0 and (i < nu - 1 or not strict)
                and (not rest or g.after(rest, "conv") is not None)):
            return g.join("output_blocks", i * S + L, 2 if attn else 1, rest)
        return None
    return None


def _from_ldm(path: str, lay: UNetLayout, sep: str, strict: bool) -> str | None:
    g = _grammar(sep)
    top = g.swap(path, g.top, reverse=True)
    if top is not None:
        return top
    S, L = lay.stride, lay.layers_per_block
    nd, nu = len(lay.down_attn), len(lay.up_attn)

    def res(rest: str) -> str | None:
        if not rest:
            return ""
        new = g.swap(rest, g.resnet, reverse=True)
        return new if new is not None else (None if strict else rest)

    if m := g.inp.fullmatch(path):
        n, k, rest = int(m[1]), int(m[2]), m[3] or ""
        if n == 0:
            return None  # input_blocks.0.0 is conv_in (top table)
        i, j = divmod(n - 1, S)
        if strict and i >= nd:
            return None
        if j == L:  # the downsampler slot
            if k != 0 or (strict and i >= nd - 1):
                return None
            op = g.after(rest, "op") if rest else ""
            return g.join("down_blocks", i, "downsamplers", 0, "conv" if rest else "", op)
        if k == 0:
            return g.join("down_blocks", i, "resnets", j, res(rest))
        if k == 1 and (not strict or lay.down_attn[i]):
            return g.join("down_blocks", i, "attentions", j, rest)
        return None
    if m := g.middle.fullmatch(path):
        n, rest = int(m[1]), m[2] or ""
        if lay.mid_attn and n == 1:
            return g.join("mid_block", "attentions", 0, rest)
        if n in ((0, 2) if lay.mid_attn else (0, 1)):
            return g.join("mid_block", "resnets", n // 2 if lay.mid_attn else n, res(rest))
        return None
    if m := g.out.fullmatch(path):
        n, k, rest = int(m[1]), int(m[2]), m[3] or ""
        i, j = divmod(n, S)
        if strict and i >= nu:
            return None
        attn = i < nu and lay.up_attn[i]
        if (k == (2 if attn else 1) and j == L and (i < nu - 1 or not strict)
                and (not rest or g.after(rest, "conv") is not None)):
            return g.join("up_blocks", i, "upsamplers", 0, rest)
        if k == 0:
            return g.join("up_blocks", i, "resnets", j, res(rest))
        if k == 1 and (attn or not strict):
            return g.join("up_blocks", i, "attentions", j, rest)
        return None
    return None


def unet_diffusers_to_ldm(path: str, layout) -> str:
    """diffusers UNet path (module or parameter, no component prefix) → LDM/SGM path (without
    ``model.diffusion_model.``). ``layout``: anything :func:`unet_layout` takes. Raises
    :class:`UnknownKeys` for a name the layout does not have."""
    out = _to_ldm(path, unet_layout(layout), ".", strict=True)
    if out is None:
        raise UnknownKeys([path], what="diffusers UNet names", hint="no LDM equivalent in this UNet layout")
    return out


def unet_ldm_to_diffusers(path: str, layout) -> str:
    """LDM/SGM UNet path (without ``model.diffusion_model.``) → diffusers path. Inverse of
    :func:`unet_diffusers_to_ldm`."""
    out = _from_ldm(path, unet_layout(layout), ".", strict=True)
    if out is None:
        raise UnknownKeys([path], what="LDM UNet names", hint="no diffusers equivalent in this UNet layout")
    return out


def unet_flat_to_ldm(flat: str, layout) -> str:
    """Flattened diffusers UNet path → flattened LDM path (unchanged if not a known block)."""
    out = _to_ldm(flat, unet_layout(layout), "_", strict=False)
    return flat if out is None else out


def unet_flat_from_ldm(flat: str, layout) -> str:
    """Flattened LDM UNet path → flattened diffusers path (unchanged if not LDM-styled)."""
    out = _from_ldm(flat, unet_layout(layout), "_", strict=False)
    return flat if out is None else out


# Each LDM block name is followed by its index: a bare prefix test would also claim the
# diffusers name ``time_embedding_linear_1`` (prefix ``time_embed``) as LDM, and then refuse
# a kohya/LyCORIS "full" file for mixing styles.
_LDM_RE = re.compile(r"^(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_\d")
_DIFFUSERS_RE = re.compile(r"^(down_blocks|mid_block|up_blocks|time_embedding|add_embedding|conv_in|conv_out|conv_norm_out)")


def unet_style(flat: str) -> str | None:
    if _LDM_RE.match(flat):
        return "ldm"
    if _DIFFUSERS_RE.match(flat):
        return "diffusers"
    return None


# --------------------------------------------------------------------------------------
# Name tables: flattened canonical path → real module path in a component
# --------------------------------------------------------------------------------------


def is_text_model_root(module: nn.Module) -> bool:
    """A transformers text model without a ``text_model`` level (transformers ≥ 5)."""
    return not hasattr(module, "text_model") and hasattr(module, "encoder") and hasattr(module, "embeddings")


#: the top-level children of a transformers CLIP text model (what follows ``text_model.``)
_TEXT_MODEL_CHILDREN = ("embeddings", "encoder", "final_layer_norm")

#: children of one module that read the same input (:mod:`lyco.siblings` runs their adapters as one op): the
#: attribute names, and where they apply — ``"self"``: only under a parent that is not cross-attention (diffusers'
#: ``Attention.is_cross_attention``: q, k and v all read the hidden states), ``"cross"``: only under one that is (k and
#: v read the text states), ``"any"``: always (CLIP's and other transformers' self-attention)
SHARED_INPUT_CHILDREN = (
    (("to_q", "to_k", "to_v"), "self"),
    (("to_k", "to_v"), "cross"),
    (("q_proj", "k_proj", "v_proj"), "any"),
)


def text_flat_canonical(flat: str) -> str:
    """A flattened text-encoder path from a file → its canonical form, with the ``text_model`` level.

    A tool walking a transformers ≥ 5 ``CLIPTextModel`` (no ``text_model`` level — LyCORIS 4.1.3
    on transformers 5, for one) writes ``lora_te_encoder_layers_0_…``, which A1111/ComfyUI/kohya
    do not map; they only know ``lora_te_text_model_encoder_layers_0_…``. Reading both forms as the
    canonical name means such a file is written back in the ecosystem's form."""
    if any(flat == c or flat.startswith(c + "_") for c in _TEXT_MODEL_CHILDREN):
        return "text_model_" + flat
    return flat


def canonical_path(component: str, path: str, module: nn.Module) -> str:
    """Module path inside a component → canonical path (adds ``text_model.`` where missing)."""
    if component in (TE, TE2) and is_text_model_root(module):
        return TE_CLASS_PREFIX + path
    return path


class NameTable:
    """Flattened names (canonical, real, and LDM aliases for a UNet) → module path in ``root``."""

    def __init__(self, component: str, root: nn.Module):
        self.component = component
        self.root = root
        self.flat_to_path: dict[str, str] = {}
        self.layout = None
        if component == UNET:
            try:
                self.layout = unet_layout(root)
            except ConfigError:  # a UNet with no LDM equivalent: no LDM aliases
                pass
        text_root = component in (TE, TE2) and is_text_model_root(root)
        for path, mod in root.named_modules():
            if not path:
                continue
            canon = TE_CLASS_PREFIX + path if text_root else path
            f = flatten(canon)
            self.flat_to_path.setdefault(f, path)
            self.flat_to_path.setdefault(flatten(path), path)
            if self.layout is not None:
                self.flat_to_path.setdefault(unet_flat_to_ldm(f, self.layout), path)

    def resolve(self, path: str) -> str | None:
        """Canonical (dotted or flat, diffusers or LDM) path → real module path, or None."""
        return self.flat_to_path.get(flatten(path))

    def canonical(self, path: str) -> str:
        return canonical_path(self.component, path, self.root)


def adaptable(module: nn.Module) -> bool:
    return layer_kind(module) is not None


# identifiers containing underscores in SD UNets (diffusers) and CLIP (transformers) module paths
_VOCAB = frozenset("""
down_blocks mid_block up_blocks transformer_blocks time_emb_proj conv_shortcut to_q to_k to_v to_out
proj_in proj_out linear_1 linear_2 time_embedding add_embedding conv_in conv_out conv_norm_out
text_model self_attn q_proj k_proj v_proj out_proj layer_norm1 layer_norm2 final_layer_norm
token_embedding position_embedding text_projection norm_out time_proj add_time_proj conv_act activation_fn
""".split())
_MAX_WORD = max(w.count("_") + 1 for w in _VOCAB)


def dot_path(flat: str) -> str:
    """Restore the dots of a flattened SD UNet / CLIP path (``down_blocks_0_attentions_0_proj_in`` →
    ``down_blocks.0.attentions.0.proj_in``) by greedy longest match against the known identifiers.
    Exact for every module of SD1.x/SD2.x/SDXL UNets and CLIP encoders (tested against the real
    architectures); other names keep their underscores between unknown tokens as dots."""
    toks = flat.split("_")
    out, i = [], 0
    while i < len(toks):
        for k in range(min(_MAX_WORD, len(toks) - i), 0, -1):
            w = "_".join(toks[i:i + k])
            if k == 1 or w in _VOCAB:
                out.append(w)
                i += k
                break
    return ".".join(out)


@lru_cache(maxsize=8)
def family_flat_table(family: str, component: str) -> dict[str, str]:
    """Flattened → dotted canonical paths for a known family, built on the meta device.

    Needs diffusers/transformers; returns {} when they are unavailable.
    """
    try:
        from .models import configs
        if component == UNET:
            root = configs.build_unet(family, device="meta")
        elif component in (TE, TE2):
            root = configs.build_text_encoder(family, index=1 if component == TE else 2, device="meta")
        else:
            return {}
    except Exception:  # noqa: BLE001 — optional: without diffusers we keep flat names
        return {}
    table = NameTable(component, root)
    out = {}
    for f, p in table.flat_to_path.items():
        out[f] = table.canonical(p)
    return out

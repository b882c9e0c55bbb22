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
from dataclasses import dataclass
from functools import lru_cache

import torch.nn as nn

from .algorithms.base import layer_kind
from .errors import FormatError

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
# UNet: diffusers ↔ LDM/SGM block names, on flattened strings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetLayout:
    """What the name mapping needs: resnets per block and which up blocks hold attentions."""

    layers_per_block: int = 2
    up_has_attn: tuple[bool, ...] = (False, True, True, True)
    n_down: int = 4


SD1_LAYOUT = UNetLayout(2, (False, True, True, True), 4)      # SD1.x and SD2.x
SDXL_LAYOUT = UNetLayout(2, (True, True, False), 3)

_RESNET_D2L = [("norm1", "in_layers_0"), ("conv1", "in_layers_2"), ("norm2", "out_layers_0"),
               ("conv2", "out_layers_3"), ("time_emb_proj", "emb_layers_1"),
               ("conv_shortcut", "skip_connection")]
_TOP_D2L = [("conv_in", "input_blocks_0_0"), ("time_embedding_linear_1", "time_embed_0"),
            ("time_embedding_linear_2", "time_embed_2"), ("add_embedding_linear_1", "label_emb_0_0"),
            ("add_embedding_linear_2", "label_emb_0_2"), ("conv_norm_out", "out_0"), ("conv_out", "out_2")]


def _sub_rest(rest: str, table, reverse: bool = False) -> str:
    for d, l in table:
        a, b = (l, d) if reverse else (d, l)
        if rest == a or rest.startswith(a + "_"):
            return b + rest[len(a):]
    return rest


def unet_flat_to_ldm(flat: str, layout: UNetLayout) -> str:
    """Flattened diffusers UNet path → flattened LDM path (unchanged if not a known block)."""
    L = layout.layers_per_block
    m = re.fullmatch(r"down_blocks_(\d+)_(resnets|attentions)_(\d+)(_.+)?", flat)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), (m[4] or "")[1:]
        if kind == "resnets":
            rest = _sub_rest(rest, _RESNET_D2L)
        return _join(f"input_blocks_{(L + 1) * i + j + 1}_{0 if kind == 'resnets' else 1}", rest)
    m = re.fullmatch(r"down_blocks_(\d+)_downsamplers_0_conv(_.+)?", flat)
    if m:
        return _join(f"input_blocks_{(L + 1) * (int(m[1]) + 1)}_0_op", (m[2] or "")[1:])
    m = re.fullmatch(r"mid_block_(resnets|attentions)_(\d+)(_.+)?", flat)
    if m:
        kind, j, rest = m[1], int(m[2]), (m[3] or "")[1:]
        if kind == "resnets":
            return _join(f"middle_block_{2 * j}", _sub_rest(rest, _RESNET_D2L))
        return _join("middle_block_1", rest)
    m = re.fullmatch(r"up_blocks_(\d+)_(resnets|attentions)_(\d+)(_.+)?", flat)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), (m[4] or "")[1:]
        if kind == "resnets":
            rest = _sub_rest(rest, _RESNET_D2L)
        return _join(f"output_blocks_{(L + 1) * i + j}_{0 if kind == 'resnets' else 1}", rest)
    m = re.fullmatch(r"up_blocks_(\d+)_upsamplers_0_conv(_.+)?", flat)
    if m:
        i = int(m[1])
        idx = 2 if i < len(layout.up_has_attn) and layout.up_has_attn[i] else 1
        return _join(f"output_blocks_{(L + 1) * i + L}_{idx}_conv", (m[2] or "")[1:])
    return _sub_rest(flat, _TOP_D2L)


def unet_flat_from_ldm(flat: str, layout: UNetLayout) -> str:
    """Flattened LDM UNet path → flattened diffusers path (unchanged if not LDM-styled)."""
    L = layout.layers_per_block
    m = re.fullmatch(r"input_blocks_(\d+)_(\d+)(_.+)?", flat)
    if m:
        n, inner, rest = int(m[1]), int(m[2]), (m[3] or "")[1:]
        if n == 0:
            return _join("conv_in", rest) if inner == 0 else flat
        i, j = divmod(n - 1, L + 1)
        if j == L:  # downsampler slot
            if rest == "op" or rest.startswith("op_"):
                return _join(f"down_blocks_{i}_downsamplers_0_conv", rest[2:].lstrip("_"))
            return flat
        if inner == 0:
            return _join(f"down_blocks_{i}_resnets_{j}", _sub_rest(rest, _RESNET_D2L, reverse=True))
        return _join(f"down_blocks_{i}_attentions_{j}", rest)
    m = re.fullmatch(r"middle_block_(\d+)(_.+)?", flat)
    if m:
        n, rest = int(m[1]), (m[2] or "")[1:]
        if n == 1:
            return _join("mid_block_attentions_0", rest)
        return _join(f"mid_block_resnets_{n // 2}", _sub_rest(rest, _RESNET_D2L, reverse=True))
    m = re.fullmatch(r"output_blocks_(\d+)_(\d+)(_.+)?", flat)
    if m:
        n, inner, rest = int(m[1]), int(m[2]), (m[3] or "")[1:]
        i, j = divmod(n, L + 1)
        if rest == "conv" or rest.startswith("conv_"):
            up_idx = 2 if i < len(layout.up_has_attn) and layout.up_has_attn[i] else 1
            if inner == up_idx and j == L:
                return _join(f"up_blocks_{i}_upsamplers_0_conv", rest[4:].lstrip("_"))
        if inner == 0:
            return _join(f"up_blocks_{i}_resnets_{j}", _sub_rest(rest, _RESNET_D2L, reverse=True))
        if inner == 1:
            return _join(f"up_blocks_{i}_attentions_{j}", rest)
        return flat
    return _sub_rest(flat, _TOP_D2L, reverse=True)


def _join(a: str, b: str) -> str:
    return f"{a}_{b}" if b else a


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


def unet_layout(unet: nn.Module) -> UNetLayout:
    cfg = getattr(unet, "config", None)
    lpb = 2
    if cfg is not None:
        v = cfg.get("layers_per_block", 2) if hasattr(cfg, "get") else getattr(cfg, "layers_per_block", 2)
        lpb = int(v if isinstance(v, int) else v[0])
    names = [n for n, _ in unet.named_modules()]
    n_up = 1 + max([int(m[1]) for n in names if (m := re.match(r"up_blocks\.(\d+)", n))], default=-1)
    n_down = 1 + max([int(m[1]) for n in names if (m := re.match(r"down_blocks\.(\d+)", n))], default=-1)
    up_attn = tuple(any(n.startswith(f"up_blocks.{i}.attentions") for n in names) for i in range(n_up))
    return UNetLayout(lpb, up_attn, n_down)


# --------------------------------------------------------------------------------------
# Name tables: flattened canonical path → real module path in a component
# --------------------------------------------------------------------------------------


def is_text_model_root(module: nn.Module) -> bool:
    """A transformers text model without a ``text_model`` level (transformers ≥ 5)."""
    return not hasattr(module, "text_model") and hasattr(module, "encoder") and hasattr(module, "embeddings")


#: the top-level children of a transformers CLIP text model (what follows ``text_model.``)
_TEXT_MODEL_CHILDREN = ("embeddings", "encoder", "final_layer_norm")


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
        self.layout = unet_layout(root) if component == UNET else None
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

"""Base-model checkpoints: diffusers folders and single-file LDM/SGM checkpoints, read lazily,
tensor by tensor, and written atomically.

Inside lyco a base-model tensor is named by its **canonical diffusers name**: the component, then
the module path in the diffusers/transformers model, e.g. ``unet.down_blocks.1.attentions.0.proj_in.weight``,
``vae.decoder.mid_block.attentions.0.to_q.weight``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight`` or
``text_encoder_2.text_projection.weight``. Text-encoder names always carry ``text_model.`` (the
ecosystem's convention, also what kohya/PEFT files use), even though transformers ≥ 5 builds a
``CLIPTextModel`` without that level: ``canonical_state_dict`` / ``load_canonical_state_dict``
translate.

A file's own keys are mapped to canonical names through :class:`KeyRef` — the file key plus how
to read the tensor out of it: a dim-0 row slice of a fused OpenCLIP ``attn.in_proj_weight`` /
``in_proj_bias`` (q, k, v in that order), a transpose (OpenCLIP ``text_projection`` stores Wᵀ), or a
1×1-conv ↔ Linear reshape (LDM VAE mid-block attention ``q/k/v/proj_out``). A merge tool can
update a slice of a fused tensor in place through the same reference.

The name mapping is made of pure, table-driven functions (no model needed):

* ``unet_layout(unet_or_config)`` → :class:`UNetLayout` (which down/up blocks have attentions,
  layers per block) and ``unet_diffusers_to_ldm(path, layout)`` / ``unet_ldm_to_diffusers(path, layout)``
  for UNet module or parameter paths (without the ``model.diffusion_model.`` prefix). They are
  defined in :mod:`lyco.naming`, whose one table also maps the flattened names of adapter files,
  and re-exported here. The output block holding an up block's upsampler is ``.2.`` when that up
  block has attentions, ``.1.`` otherwise (SD1 ``up_blocks.0`` → ``output_blocks.2.1.conv``,
  SDXL → ``output_blocks.2.2.conv``).
* ``vae_diffusers_to_ldm`` / ``vae_ldm_to_diffusers`` (decoder up blocks are numbered in reverse).
* ``hf_to_openclip`` / ``openclip_to_hf`` for the OpenCLIP text towers (SD2 ``cond_stage_model.model.``,
  SDXL ``conditioner.embedders.1.model.``).
* ``to_file_ref(name, layout)`` / ``from_file_key(key, layout)`` for whole single files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from lyco.errors import ConfigError, FormatError, ShapeMismatch, UnknownKeys
from lyco.formats import safetensors_io
# the UNet block layout and its diffusers↔LDM mapping live in one place, lyco.naming (which maps
# flattened adapter-file keys with the same table); re-exported here as part of this module's API
from lyco.naming import UNetLayout, unet_diffusers_to_ldm, unet_layout, unet_ldm_to_diffusers

__all__ = [
    "KeyRef", "UNetLayout", "SingleFileLayout", "Checkpoint",
    "unet_layout", "unet_diffusers_to_ldm", "unet_ldm_to_diffusers",
    "vae_diffusers_to_ldm", "vae_ldm_to_diffusers", "vae_attention_is_conv",
    "hf_to_openclip", "openclip_to_hf",
    "single_file_layout", "to_file_ref", "from_file_key", "detect_family",
    "open_checkpoint", "load_pipeline", "write_single_file", "to_single_file",
    "canonical_state_dict", "load_canonical_state_dict", "component_config",
    "UNET_PREFIX", "VAE_PREFIX",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_PREFIX = "cond_stage_model.transformer."
SD2_TE_PREFIX = "cond_stage_model.model."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."

#: single-file key prefix → (component, naming style)
_READ_PREFIXES = (
    (UNET_PREFIX, "unet", "unet"),
    (VAE_PREFIX, "vae", "vae"),
    (SD1_TE_PREFIX, "text_encoder", "hf"),
    (SD2_TE_PREFIX, "text_encoder", "openclip"),
    (SDXL_TE1_PREFIX, "text_encoder", "hf"),
    (SDXL_TE2_PREFIX, "text_encoder_2", "openclip"),
)

CONFIGS_METADATA_KEY = "lyco.configs"
#: ``lyco.configs["tokenizer"]`` of files written by ``lyco.models.tiny.save_tiny_single_file``.
TINY_TOKENIZER_MARKER = "lyco-tiny-clip"


# ==============================================================================================
# KeyRef
# ==============================================================================================

@dataclass(frozen=True)
class KeyRef:
    """Where a canonical tensor lives in a file.

    ``key``: the file's tensor key. ``rows``: ``(start, stop)`` on dim 0 of a fused tensor (the
    canonical tensor is ``file[key][start:stop]``). ``transpose``: the file stores the transpose.
    ``conv1x1``: the file stores a 1×1 conv weight ``(out, in, 1, 1)`` for a canonical Linear
    ``(out, in)`` (files that already store 2-D are accepted too).
    """

    key: str
    rows: tuple[int, int] | None = None
    transpose: bool = False
    conv1x1: bool = False

    def to_canonical(self, t: torch.Tensor, *, sliced: bool = False) -> torch.Tensor:
        """File tensor → canonical tensor (``sliced``: ``t`` is already the row slice)."""
        if self.rows is not None and not sliced:
            t = t[self.rows[0]:self.rows[1]]
        if self.transpose:
            t = t.t().contiguous()
        if self.conv1x1 and t.ndim == 4:
            t = t.reshape(t.shape[0], t.shape[1])
        return t

    def to_file(self, t: torch.Tensor) -> torch.Tensor:
        """Canonical tensor → the file's layout (for ``rows``: the slice's content)."""
        if self.transpose:
            t = t.t().contiguous()
        if self.conv1x1 and t.ndim == 2:
            t = t.reshape(t.shape[0], t.shape[1], 1, 1)
        return t


def _unknown(path: str, what: str, hint: str = "") -> UnknownKeys:
    return UnknownKeys([path], what=what, hint=hint)


def _join(*parts) -> str:
    return ".".join(str(p) for p in parts)


# ==============================================================================================
# VAE
# ==============================================================================================

_VAE_ATTN_D2L = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTN_L2D = {v: k for k, v in _VAE_ATTN_D2L.items()}
_VAE_ATTN_WEIGHT = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight")


def _vae_res(rest: list[str], to_ldm: bool) -> list[str]:
    if rest and rest[0] == ("conv_shortcut" if to_ldm else "nin_shortcut"):
        return ["nin_shortcut" if to_ldm else "conv_shortcut"] + rest[1:]
    return rest


def _vae_attn_d2l(rest: list[str]) -> list[str]:
    if not rest:
        return []
    head2 = ".".join(rest[:2])
    if head2 in _VAE_ATTN_D2L:
        return [_VAE_ATTN_D2L[head2]] + rest[2:]
    if rest[0] in _VAE_ATTN_D2L:
        return [_VAE_ATTN_D2L[rest[0]]] + rest[1:]
    raise ValueError(rest[0])


def _vae_attn_l2d(rest: list[str]) -> list[str]:
    if not rest:
        return []
    if rest[0] in _VAE_ATTN_L2D:
        return _VAE_ATTN_L2D[rest[0]].split(".") + rest[1:]
    raise ValueError(rest[0])


def vae_attention_is_conv(path: str) -> bool:
    """True for a diffusers VAE attention Linear weight that LDM stores as a 1×1 conv."""
    return _VAE_ATTN_WEIGHT.fullmatch(path) is not None


def vae_diffusers_to_ldm(path: str, n_blocks: int = 4) -> str:
    """diffusers AutoencoderKL path → LDM ``first_stage_model`` path (without the prefix).
    ``n_blocks``: ``len(block_out_channels)`` (the decoder's up blocks are numbered in reverse)."""
    p = path.split(".")
    try:
        if p[0] in ("quant_conv", "post_quant_conv"):
            return path
        side, sub = p[0], p[1]
        if side in ("encoder", "decoder"):
            if sub in ("conv_in", "conv_out"):
                return path
            if sub == "conv_norm_out":
                return _join(side, "norm_out", *p[2:])
            if sub == "mid_block":
                kind, j, rest = p[2], int(p[3]), p[4:]
                if kind == "resnets" and j in (0, 1):
                    return _join(side, "mid", f"block_{j + 1}", *_vae_res(rest, True))
                if kind == "attentions" and j == 0:
                    return _join(side, "mid", "attn_1", *_vae_attn_d2l(rest))
            if side == "encoder" and sub == "down_blocks":
                i, kind, j, rest = int(p[2]), p[3], int(p[4]), p[5:]
                if i < n_blocks:
                    if kind == "resnets":
                        return _join("encoder.down", i, "block", j, *_vae_res(rest, True))
                    if kind == "downsamplers" and j == 0 and i < n_blocks - 1:
                        return _join("encoder.down", i, "downsample", *rest)
            if side == "decoder" and sub == "up_blocks":
                i, kind, j, rest = int(p[2]), p[3], int(p[4]), p[5:]
                if i < n_blocks:
                    k = n_blocks - 1 - i
                    if kind == "resnets":
                        return _join("decoder.up", k, "block", j, *_vae_res(rest, True))
                    if kind == "upsamplers" and j == 0 and i < n_blocks - 1:
                        return _join("decoder.up", k, "upsample", *rest)
    except (IndexError, ValueError):
        pass
    raise _unknown(path, "diffusers VAE names", "no LDM equivalent")


def vae_ldm_to_diffusers(path: str, n_blocks: int = 4) -> str:
    """LDM ``first_stage_model`` path (without the prefix) → diffusers AutoencoderKL path."""
    p = path.split(".")
    try:
        if p[0] in ("quant_conv", "post_quant_conv"):
            return path
        side, sub = p[0], p[1]
        if side in ("encoder", "decoder"):
            if sub in ("conv_in", "conv_out"):
                return path
            if sub == "norm_out":
                return _join(side, "conv_norm_out", *p[2:])
            if sub == "mid":
                blk, rest = p[2], p[3:]
                if blk in ("block_1", "block_2"):
                    return _join(side, "mid_block", "resnets", int(blk[-1]) - 1, *_vae_res(rest, False))
                if blk == "attn_1":
                    return _join(side, "mid_block", "attentions", 0, *_vae_attn_l2d(rest))
            if side == "encoder" and sub == "down":
                i, kind, rest = int(p[2]), p[3], p[4:]
                if i < n_blocks:
                    if kind == "block":
                        return _join("encoder.down_blocks", i, "resnets", int(rest[0]), *_vae_res(rest[1:], False))
                    if kind == "downsample" and i < n_blocks - 1:
                        return _join("encoder.down_blocks", i, "downsamplers", 0, *rest)
            if side == "decoder" and sub == "up":
                k, kind, rest = int(p[2]), p[3], p[4:]
                if k < n_blocks:
                    i = n_blocks - 1 - k
                    if kind == "block":
                        return _join("decoder.up_blocks", i, "resnets", int(rest[0]), *_vae_res(rest[1:], False))
                    if kind == "upsample" and i < n_blocks - 1:
                        return _join("decoder.up_blocks", i, "upsamplers", 0, *rest)
    except (IndexError, ValueError):
        pass
    raise _unknown(path, "LDM VAE names", "no diffusers equivalent")


# ==============================================================================================
# Text encoders
# ==============================================================================================

_OC_SIMPLE = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OC_SIMPLE_REV = {v: k for k, v in _OC_SIMPLE.items()}
_OC_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OC_LAYER_REV = {v: k for k, v in _OC_LAYER.items()}
_QKV = ("q_proj", "k_proj", "v_proj")
_HF_LAYER_RE = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OC_LAYER_RE = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
_OC_INPROJ_RE = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")


def hf_to_openclip(name: str, width: int) -> tuple[str, tuple[int, int] | None, bool]:
    """Canonical CLIP text-model parameter (``text_model.…`` or ``text_projection.weight``, no
    component prefix) → ``(OpenCLIP key, rows, transpose)``. q/k/v projections are row slices
    ``[0:w]``, ``[w:2w]``, ``[2w:3w]`` of ``attn.in_proj_weight``/``in_proj_bias`` (``width`` = w)."""
    if name in _OC_SIMPLE:
        return _OC_SIMPLE[name], None, False
    if name == "text_projection.weight":
        return "text_projection", None, True
    m = _HF_LAYER_RE.fullmatch(name)
    if m:
        i, sub, kind = m.groups()
        if sub.startswith("self_attn.") and sub[len("self_attn."):] in _QKV:
            idx = _QKV.index(sub[len("self_attn."):])
            return f"transformer.resblocks.{i}.attn.in_proj_{kind}", (idx * width, (idx + 1) * width), False
        if sub in _OC_LAYER:
            return f"transformer.resblocks.{i}.{_OC_LAYER[sub]}.{kind}", None, False
    raise _unknown(name, "CLIP text-model names", "no OpenCLIP equivalent")


def openclip_to_hf(key: str, width: int) -> list[tuple[str, tuple[int, int] | None, bool]]:
    """OpenCLIP text-tower key (no ``…model.`` prefix) → canonical CLIP names with
    ``(name, rows, transpose)``; a fused ``in_proj`` gives three entries (q, k, v)."""
    if key in _OC_SIMPLE_REV:
        return [(_OC_SIMPLE_REV[key], None, False)]
    if key == "text_projection":
        return [("text_projection.weight", None, True)]
    m = _OC_INPROJ_RE.fullmatch(key)
    if m:
        i, kind = m.groups()
        return [(f"text_model.encoder.layers.{i}.self_attn.{q}.{kind}", (n * width, (n + 1) * width), False)
                for n, q in enumerate(_QKV)]
    m = _OC_LAYER_RE.fullmatch(key)
    if m:
        i, sub, kind = m.groups()
        if sub in _OC_LAYER_REV:
            return [(f"text_model.encoder.layers.{i}.{_OC_LAYER_REV[sub]}.{kind}", None, False)]
    raise _unknown(key, "OpenCLIP text-tower keys", "no CLIP text-model equivalent")


def _te_canonical(key: str) -> str:
    """A CLIP text model's own key → canonical (``text_model.`` inserted where the module tree
    lacks it: transformers ≥ 5 ``CLIPTextModel``, or files written by old transformers)."""
    if key.startswith("text_model.") or key.startswith("text_projection."):
        return key
    return "text_model." + key


def _canon_local(component: str, key: str) -> str:
    return _te_canonical(key) if component.startswith("text_encoder") else key


def canonical_state_dict(module: torch.nn.Module, component: str) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` under canonical names ``<component>.<…>``."""
    return {f"{component}.{_canon_local(component, k)}": v for k, v in module.state_dict().items()}


def load_canonical_state_dict(module: torch.nn.Module, component: str, tensors: Mapping[str, torch.Tensor],
                              *, strict: bool = True, assign: bool = False):
    """Load tensors named canonically (``<component>.<…>``) into ``module``."""
    local = {f"{component}.{_canon_local(component, k)}": k for k in module.state_dict()}
    sd, extra = {}, []
    for name, t in tensors.items():
        if name in local:
            sd[local[name]] = t
        elif name.startswith(component + "."):
            extra.append(name)
    if strict and extra:
        raise UnknownKeys(extra, what=f"{component} tensors")
    return module.load_state_dict(sd, strict=strict, assign=assign)


# ==============================================================================================
# Whole single files
# ==============================================================================================

@dataclass(frozen=True)
class SingleFileLayout:
    """Everything the single-file name mapping of one model depends on."""

    family: str
    unet: UNetLayout
    vae_blocks: int = 4
    te_width: int = 768
    te2_width: int | None = None


def single_file_layout(family: str, configs: Mapping[str, Mapping[str, Any]] | None = None) -> SingleFileLayout:
    """Layout from component configs (default: the family's real configs)."""
    from lyco.models import configs as C

    C.check_family(family)
    cfgs = dict(C.all_configs(family))
    if configs:
        cfgs.update({k: v for k, v in configs.items() if isinstance(v, Mapping)})
    te2 = cfgs.get("text_encoder_2") if family == "sdxl" else None
    return SingleFileLayout(
        family=family,
        unet=unet_layout(cfgs["unet"]),
        vae_blocks=len(cfgs["vae"]["block_out_channels"]),
        te_width=int(cfgs["text_encoder"]["hidden_size"]),
        te2_width=int(te2["hidden_size"]) if te2 else None,
    )


def to_file_ref(name: str, layout: SingleFileLayout) -> KeyRef:
    """Canonical name → where a single file of ``layout.family`` stores it."""
    comp, _, rest = name.partition(".")
    fam = layout.family
    if comp == "unet":
        return KeyRef(UNET_PREFIX + unet_diffusers_to_ldm(rest, layout.unet))
    if comp == "vae":
        return KeyRef(VAE_PREFIX + vae_diffusers_to_ldm(rest, layout.vae_blocks), conv1x1=vae_attention_is_conv(rest))
    if comp == "text_encoder":
        if fam == "sd2":
            key, rows, tr = hf_to_openclip(rest, layout.te_width)
            return KeyRef(SD2_TE_PREFIX + key, rows, tr)
        if rest.startswith("text_model."):
            return KeyRef((SD1_TE_PREFIX if fam == "sd1" else SDXL_TE1_PREFIX) + rest)
    if comp == "text_encoder_2" and fam == "sdxl":
        key, rows, tr = hf_to_openclip(rest, layout.te2_width or layout.te_width)
        return KeyRef(SDXL_TE2_PREFIX + key, rows, tr)
    raise _unknown(name, f"canonical names for a {fam} single file")


def from_file_key(key: str, layout: SingleFileLayout, shape=None) -> list[tuple[str, KeyRef]]:
    """Single-file key → ``[(canonical name, KeyRef), …]`` (three entries for a fused in_proj).
    ``shape``: optional ``key → shape`` callable; when given, the q/k/v rows of a fused in_proj come
    from the tensor's own size (``rows = 3·width``) instead of the layout's width.
    Raises :class:`UnknownKeys` for keys with no canonical counterpart (EMA copies, schedule
    buffers, ``logit_scale``, ``position_ids`` …)."""
    for prefix, comp, style in _READ_PREFIXES:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if style == "unet":
            return [(f"unet.{unet_ldm_to_diffusers(rest, layout.unet)}", KeyRef(key))]
        if style == "vae":
            name = vae_ldm_to_diffusers(rest, layout.vae_blocks)
            return [(f"vae.{name}", KeyRef(key, conv1x1=vae_attention_is_conv(name)))]
        if style == "hf":
            return [(f"{comp}.{_te_canonical(rest)}", KeyRef(key))]
        width = layout.te2_width if comp == "text_encoder_2" and layout.te2_width else layout.te_width
        if shape is not None and "in_proj_" in rest:
            rows = int(tuple(shape(key))[0])
            if rows % 3:
                raise FormatError(f"fused in_proj has {rows} rows, not a multiple of 3", key=key)
            width = rows // 3
        return [(f"{comp}.{n}", KeyRef(key, rows, tr)) for n, rows, tr in openclip_to_hf(rest, width)]
    raise _unknown(key, "single-file keys", "not a UNet, VAE or text-encoder tensor")


def detect_family(keys: Iterable[str], shape=None) -> str:
    """Family of a single file from its keys: sdxl if it has SDXL's second text encoder
    (``conditioner.embedders.1``) or the text-time embedding; sd2 if it has the OpenCLIP text tower
    ``cond_stage_model.model`` or 1024-dim cross-attention / Linear proj_in; else sd1."""
    keys = list(keys)
    ks = set(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys) or UNET_PREFIX + "label_emb.0.0.weight" in ks:
        return "sdxl"
    if any(k.startswith(SD2_TE_PREFIX) for k in keys):
        return "sd2"
    if shape is not None:
        probe = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        if probe in ks and tuple(shape(probe))[-1] == 1024:
            return "sd2"
        probe = UNET_PREFIX + "input_blocks.1.1.proj_in.weight"
        if probe in ks and len(tuple(shape(probe))) == 2:
            return "sd2"
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return "sd1"
    raise FormatError("found no Stable Diffusion UNet keys ('model.diffusion_model.*'); "
                      "expected an SD1/SD2/SDXL single-file checkpoint")


# ==============================================================================================
# Readers
# ==============================================================================================

#: safetensors dtype code ↔ torch dtype (the table of :mod:`lyco.formats.safetensors_io`)
_ST_DTYPES = {code: dt for code, (_, dt) in safetensors_io.DTYPES.items() if dt is not None}
_ST_CODES = {dt: code for code, dt in _ST_DTYPES.items()}


class _SafetensorsSource:
    def __init__(self, path: Path):
        from safetensors import safe_open

        from .safetensors_io import read_header

        self.path = path
        read_header(path)  # lyco's checks first: bounded header, sizes, offsets, no overlap (FormatError)
        try:
            self._f = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise FormatError(f"not a readable safetensors file ({e})", file=str(path)) from None
        self.metadata = dict(self._f.metadata() or {})

    def keys(self):
        return list(self._f.keys())

    def get(self, key):
        return self._f.get_tensor(key)

    def rows(self, key, a, b):
        return self._f.get_slice(key)[a:b]

    def shape(self, key):
        return tuple(self._f.get_slice(key).get_shape())

    def dtype(self, key):
        code = self._f.get_slice(key).get_dtype()
        if code not in _ST_DTYPES:
            raise FormatError(f"unsupported dtype {code}", file=str(self.path), key=key)
        return _ST_DTYPES[code]

    def close(self):
        f, self._f = self._f, None
        if f is not None and hasattr(f, "__exit__"):
            try:
                f.__exit__(None, None, None)
            except Exception:
                pass


class _DictSource:
    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]):
        self.path, self._t, self.metadata = path, tensors, {}

    def keys(self):
        return list(self._t)

    def get(self, key):
        return self._t[key]

    def rows(self, key, a, b):
        return self._t[key][a:b]

    def shape(self, key):
        return tuple(self._t[key].shape)

    def dtype(self, key):
        return self._t[key].dtype

    def close(self):
        self._t = {}


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A legacy pickle checkpoint through ``torch.load(weights_only=True)`` only (memory-mapped)."""
    return safetensors_io.load_legacy(path, mmap=True)


def _json_file(p: Path) -> dict[str, Any]:
    """A JSON object from a file of a diffusers folder (FormatError for anything else)."""
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"not a readable JSON file ({type(e).__name__}: {str(e)[:200]})", file=str(p)) from None
    if not isinstance(obj, dict):
        raise FormatError(f"holds a JSON {type(obj).__name__}; expected an object", file=str(p))
    return obj


def _folder_weight_files(d: Path) -> list[Path]:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (d / name).is_file():
            return [d / name]
    for idx in sorted(d.glob("*.safetensors.index.json")):
        wm = _json_file(idx).get("weight_map", {})
        if not isinstance(wm, dict) or not all(isinstance(f, str) and f and "/" not in f and "\\" not in f
                                               and f not in (".", "..") for f in wm.values()):
            raise FormatError("'weight_map' is not a map of tensor names to shard file names in this folder",
                              file=str(idx))
        return [d / f for f in sorted(set(wm.values()))]
    variants = sorted(d.glob("diffusion_pytorch_model.*.safetensors")) + sorted(d.glob("model.*.safetensors"))
    if variants:
        return [variants[0]]
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (d / name).is_file():
            return [d / name]
    return []


# ==============================================================================================
# Checkpoint
# ==============================================================================================

class Checkpoint:
    """A base-model checkpoint opened for lazy, tensor-by-tensor access.

    ``keys()``/``get(key)``/``shape(key)``/``dtype(key)`` speak the file's own keys (for a
    diffusers folder: ``<component>.<key in that component's file>``). ``mapping`` maps every
    canonical diffusers name the file provides to a :class:`KeyRef`; ``get_canonical(name)`` reads
    one tensor by canonical name. ``unmapped`` lists file keys with no canonical counterpart.
    """

    def __init__(self, path: Path, kind: str, sources: list, index: dict[str, tuple[int, str]],
                 metadata: dict[str, str], family: str, configs: dict[str, Any],
                 layout: SingleFileLayout | None, mapping: dict[str, KeyRef], unmapped: list[str]):
        self.path, self.kind, self.family = path, kind, family
        self.metadata, self.configs, self.layout = metadata, configs, layout
        self.mapping, self.unmapped = mapping, unmapped
        self._sources, self._index = sources, index

    # -- file keys ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._index)

    def __contains__(self, key) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def _src(self, key):
        try:
            i, inner = self._index[key]
        except KeyError:
            raise UnknownKeys([key], file=str(self.path), what="checkpoint keys") from None
        return self._sources[i], inner

    def get(self, key: str) -> torch.Tensor:
        src, inner = self._src(key)
        return src.get(inner)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        src, inner = self._src(key)
        return src.rows(inner, start, stop)

    def shape(self, key: str) -> tuple[int, ...]:
        src, inner = self._src(key)
        return src.shape(inner)

    def dtype(self, key: str) -> torch.dtype:
        src, inner = self._src(key)
        return src.dtype(inner)

    # -- canonical names -----------------------------------------------------------------------
    def names(self, component: str | None = None) -> list[str]:
        if component is None:
            return list(self.mapping)
        return [n for n in self.mapping if n.startswith(component + ".")]

    def ref(self, name: str) -> KeyRef:
        try:
            return self.mapping[name]
        except KeyError:
            raise UnknownKeys([name], file=str(self.path), what="canonical names") from None

    def get_canonical(self, name: str) -> torch.Tensor:
        ref = self.ref(name)
        if ref.rows is not None:
            return ref.to_canonical(self.get_rows(ref.key, *ref.rows), sliced=True)
        return ref.to_canonical(self.get(ref.key))

    get_diffusers = get_canonical

    def canonical_shape(self, name: str) -> tuple[int, ...]:
        ref = self.ref(name)
        shape = list(self.shape(ref.key))
        if ref.rows is not None:
            shape[0] = ref.rows[1] - ref.rows[0]
        if ref.transpose:
            shape = shape[::-1]
        if ref.conv1x1 and len(shape) == 4:
            shape = shape[:2]
        return tuple(shape)

    def state_dict(self, component: str) -> dict[str, torch.Tensor]:
        """All tensors of one component under canonical names without the component prefix."""
        n = len(component) + 1
        return {name[n:]: self.get_canonical(name) for name in self.names(component)}

    # -- lifetime ----------------------------------------------------------------------------
    def close(self):
        for s in self._sources:
            s.close()
        self._sources = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return (f"Checkpoint({str(self.path)!r}, kind={self.kind!r}, family={self.family!r}, "
                f"{len(self._index)} keys, {len(self.mapping)} mapped)")


def _configs_from_metadata(meta: Mapping[str, str], path: Path) -> dict[str, Any] | None:
    raw = meta.get(CONFIGS_METADATA_KEY)
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"metadata {CONFIGS_METADATA_KEY!r} is not valid JSON ({e})", file=str(path)) from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("unet"), dict):
        raise FormatError(f"metadata {CONFIGS_METADATA_KEY!r} holds no component configs", file=str(path))
    return cfg


def _real_configs_for(family: str, shape, keys) -> dict[str, Any]:
    from lyco.models.configs import all_configs

    cfgs = all_configs(family)
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    conv_out = UNET_PREFIX + "out.2.weight"
    if conv_in in keys:
        cfgs["unet"]["in_channels"] = int(shape(conv_in)[1])
    if conv_out in keys:
        cfgs["unet"]["out_channels"] = int(shape(conv_out)[0])
    return cfgs


def _map_single(keys: list[str], layout: SingleFileLayout, path: Path, shape=None):
    mapping: dict[str, KeyRef] = {}
    unmapped: list[str] = []
    for key in keys:
        try:
            entries = from_file_key(key, layout, shape)
        except UnknownKeys:
            unmapped.append(key)
            continue
        for name, ref in entries:
            if name in mapping:
                raise FormatError(f"keys {mapping[name].key!r} and {key!r} both hold {name!r}; "
                                  f"the file mixes two naming styles", file=str(path))
            mapping[name] = ref
    return mapping, unmapped


def _open_single(path: Path, family: str | None) -> Checkpoint:
    if path.suffix.lower() == ".safetensors":
        src = _SafetensorsSource(path)
        kind = "safetensors"
    else:
        src = _DictSource(path, _load_pickle(path))
        kind = "pickle"
    keys = src.keys()
    index = {k: (0, k) for k in keys}
    try:
        configs = _configs_from_metadata(src.metadata, path)
        fam = family or (configs or {}).get("family") or detect_family(keys, src.shape)
        from lyco.models.configs import check_family

        check_family(fam)
        if configs is None:
            configs = _real_configs_for(fam, src.shape, set(keys))
        configs = dict(configs)
        configs["family"] = fam
        try:
            layout = single_file_layout(fam, configs)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise FormatError(f"the component configs (metadata {CONFIGS_METADATA_KEY!r}, or the {fam} "
                              f"defaults) do not describe a {fam} model ({type(e).__name__}: {str(e)[:200]})",
                              file=str(path)) from None
        mapping, unmapped = _map_single(keys, layout, path, src.shape)
    except FormatError as e:
        src.close()
        if e.file is None:
            raise FormatError(str(e), file=str(path)) from None
        raise
    except Exception:
        src.close()
        raise
    return Checkpoint(path, kind, [src], index, src.metadata, fam, configs, layout, mapping, unmapped)


_OLD_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _folder_canonical(comp: str, key: str) -> str:
    if comp.startswith("text_encoder"):
        return _te_canonical(key)
    if comp == "vae":
        p = key.split(".")
        if len(p) >= 5 and p[1] == "mid_block" and p[2] == "attentions" and p[4] in _OLD_VAE_ATTN:
            return ".".join(p[:4] + [_OLD_VAE_ATTN[p[4]]] + p[5:])
    return key


def _open_folder(path: Path, family: str | None) -> Checkpoint:
    from lyco.models.configs import check_family, family_of_unet_config

    sources, index, configs = [], {}, {}
    mapping: dict[str, KeyRef] = {}
    try:
        for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
            d = path / comp
            if not d.is_dir():
                continue
            files = _folder_weight_files(d)
            if not files:
                continue
            cfg_file = d / "config.json"
            if cfg_file.is_file():
                configs[comp] = _json_file(cfg_file)
            for f in files:
                if not f.is_file():
                    raise FormatError(f"shard {f.name} listed in the index is missing", file=str(d))
                src = _SafetensorsSource(f) if f.suffix == ".safetensors" else _DictSource(f, _load_pickle(f))
                sources.append(src)
                for k in src.keys():
                    fk = f"{comp}.{k}"
                    index[fk] = (len(sources) - 1, k)
                    mapping[f"{comp}.{_folder_canonical(comp, k)}"] = KeyRef(fk)
        if "unet" not in configs:
            raise FormatError("not a diffusers Stable Diffusion folder: no unet/ with config.json and "
                              "weights", file=str(path))
        sched = path / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            configs["scheduler"] = _json_file(sched)
        try:
            fam = family or ("sdxl" if "text_encoder_2" in configs else family_of_unet_config(configs["unet"]))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise FormatError(f"unet/config.json does not describe a UNet ({type(e).__name__}: {e})",
                              file=str(path)) from None
        check_family(fam)
        configs["family"] = fam
    except Exception:
        for s in sources:
            s.close()
        raise
    return Checkpoint(path, "diffusers", sources, index, {}, fam, configs, None, mapping, [])


def open_checkpoint(path: str | os.PathLike, family: str | None = None) -> Checkpoint:
    """Open a diffusers folder, a single-file ``.safetensors`` (LDM/SGM layout) or a legacy
    ``.ckpt``/``.pt``/``.pth``/``.bin`` (read with ``torch.load(weights_only=True)`` only; anything
    needing code execution raises :class:`lyco.errors.UnsafeFile`). Nothing is loaded until asked
    for (legacy pickles excepted). ``family`` overrides detection."""
    p = Path(path)
    if p.is_dir():
        return _open_folder(p, family)
    if not p.is_file():
        raise FormatError("no such file or folder", file=str(p))
    if p.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        return _open_single(p, family)
    raise FormatError(f"unknown checkpoint type {p.suffix!r}; expected a diffusers folder, a "
                      f".safetensors file or a legacy .ckpt/.pt/.pth/.bin", file=str(p))


# ==============================================================================================
# Loading a pipeline
# ==============================================================================================

def _empty_module(cfg: Mapping[str, Any]):
    """Build a module with parameters on the meta device and buffers real (so non-persistent
    buffers such as CLIP's position_ids keep their values)."""
    from lyco.models.configs import build_from_config

    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate comes with the sd extra
        return build_from_config(cfg, device="cpu")
    with init_empty_weights():
        return build_from_config(cfg, device=None)


def _load_component(ck: Checkpoint, component: str, module: torch.nn.Module, dtype: torch.dtype | None):
    wanted = module.state_dict(keep_vars=True)
    sd, missing = {}, []
    for local, target in wanted.items():
        name = f"{component}.{_canon_local(component, local)}"
        if name not in ck.mapping:
            missing.append(name)
            continue
        t = ck.get_canonical(name)
        if tuple(t.shape) != tuple(target.shape):
            raise ShapeMismatch(name, t.shape, target.shape, file=str(ck.path), key=ck.mapping[name].key)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        if t.data_ptr() % 64 or not t.is_contiguous():
            # safetensors hands out tensors at 8-byte offsets; unaligned weights take other SIMD
            # paths and change results in the last bits, so give every weight its own storage
            t = t.clone(memory_format=torch.contiguous_format)
        sd[local] = t
    if missing:
        shown = ", ".join(repr(m) for m in missing[:8])
        more = f" … and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise FormatError(f"{len(missing)} tensors of the {component} are missing: {shown}{more}",
                          file=str(ck.path))
    module.load_state_dict(sd, strict=True, assign=True)
    return module.eval()


def load_pipeline(path: str | os.PathLike, family: str | None = None, dtype: torch.dtype | None = None, *,
                  tokenizer=None, tokenizer_2=None, scheduler=None, prediction_type: str | None = None):
    """A diffusers ``StableDiffusionPipeline``/``StableDiffusionXLPipeline`` from a diffusers folder
    (``from_pretrained(folder, local_files_only=True)``) or a single file (converted with the name
    mapping into modules built from the real configs, or from the ``lyco.configs`` metadata the
    tiny files carry). ``dtype=None`` keeps the stored dtypes. No network access: a real-size single
    file has no tokenizer inside, so pass ``tokenizer``/``tokenizer_2`` (else they are ``None`` and the
    pipeline needs ``prompt_embeds``). ``prediction_type`` overrides the scheduler's (e.g. SD 2.x
    512-base checkpoints are "epsilon", the default SD2 config is the 768-v one)."""
    from lyco.models import configs as C

    p = Path(path)
    if p.is_dir():
        with open_checkpoint(p, family) as ck:
            fam = ck.family
        return _load_folder_pipeline(p, fam, dtype, prediction_type)
    with open_checkpoint(p, family) as ck:
        fam, cfgs = ck.family, ck.configs
        comps = {}
        for comp in C.COMPONENTS[fam]:
            if comp not in cfgs:
                raise FormatError(f"no config for component {comp!r}", file=str(p))
            comps[comp] = _load_component(ck, comp, _empty_module(cfgs[comp]), dtype)
    if scheduler is None:
        scfg = dict(cfgs.get("scheduler") or C.get_config(fam, "scheduler"))
        if prediction_type:
            scfg["prediction_type"] = prediction_type
        scheduler = C.build_from_config(scfg)
    if cfgs.get("tokenizer") == TINY_TOKENIZER_MARKER:
        from lyco.models.tiny import tiny_tokenizer  # only for the built-in tiny models

        tokenizer = tokenizer or tiny_tokenizer()
        if fam == "sdxl":
            tokenizer_2 = tokenizer_2 or tiny_tokenizer()
    elif tokenizer is None:
        warnings.warn(f"{p}: a single-file checkpoint carries no tokenizer and lyco does not download "
                      f"one; pass tokenizer=… (and tokenizer_2=… for SDXL) or use prompt_embeds",
                      stacklevel=2)
    return C.assemble_pipeline(fam, comps, scheduler, tokenizer, tokenizer_2)


def _load_folder_pipeline(folder: Path, fam: str, dtype, prediction_type):
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if fam == "sdxl":
        from diffusers import StableDiffusionXLPipeline as cls
    else:
        from diffusers import StableDiffusionPipeline as cls

        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(str(folder), **kwargs)
    if prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    return pipe


# ==============================================================================================
# Writing
# ==============================================================================================

def _tensor_bytes(t: torch.Tensor):
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy()


def write_single_file(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                      path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a ``.safetensors`` file tensor by tensor, atomically.

    ``tensors``: a mapping or an iterable of ``(key, tensor)`` pairs (consumed once; only one
    tensor is held at a time). Tensor data is spooled to a temporary file next to ``path``, then
    header + data go to a second temporary name in the same folder, which is flushed, fsynced and
    renamed over ``path`` (:func:`lyco.formats.safetensors_io.atomic_write`). On any error no file
    at ``path`` is created or changed.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FormatError("output folder does not exist", file=str(folder))
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    meta = safetensors_io._check_metadata(metadata, str(path))
    header: dict[str, Any] = {}
    with safetensors_io.atomic_write(path, overwrite=True) as out, \
            tempfile.TemporaryFile(dir=str(folder)) as spool:
        offset = 0
        for key, t in items:
            key = str(key)
            if key in header or key == "__metadata__":
                raise FormatError(f"duplicate or reserved tensor key {key!r}", file=str(path))
            if not isinstance(t, torch.Tensor):
                raise FormatError(f"value is a {type(t).__name__}, not a tensor", file=str(path), key=key)
            if t.device.type == "meta":
                raise FormatError("tensor is on the meta device (no data)", file=str(path), key=key)
            if t.dtype not in _ST_CODES:
                raise FormatError(f"dtype {t.dtype} has no safetensors code", file=str(path), key=key)
            data = _tensor_bytes(t)
            n = len(data) if isinstance(data, bytes) else data.nbytes
            spool.write(data)
            header[key] = {"dtype": _ST_CODES[t.dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + n]}
            offset += n
        if meta:
            header = {"__metadata__": meta, **header}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        spool.seek(0)
        shutil.copyfileobj(spool, out, 16 << 20)
    return path


def component_config(module) -> dict[str, Any]:
    """A JSON-able config dict of a diffusers model, transformers CLIP text model or scheduler,
    with its class (``_class_name`` / ``architectures``), for ``lyco.models.configs.build_from_config``."""
    cfg = module.config
    if hasattr(cfg, "to_dict") and not isinstance(cfg, Mapping):
        d = cfg.to_dict()
        for k in ("transformers_version", "dtype", "torch_dtype", "_name_or_path"):
            d.pop(k, None)
        d["architectures"] = [type(module).__name__]
    else:
        d = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
        d["_class_name"] = type(module).__name__
    return json.loads(json.dumps(d, default=str))


def _components_of(pipe_or_components) -> dict[str, Any]:
    if isinstance(pipe_or_components, Mapping):
        return dict(pipe_or_components)
    comps = getattr(pipe_or_components, "components", None)
    if not isinstance(comps, Mapping):
        raise ConfigError(f"expected a diffusers pipeline or a dict of components, got "
                          f"{type(pipe_or_components).__name__}")
    return dict(comps)


def _file_items(component: str, module: torch.nn.Module, layout: SingleFileLayout,
                dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    pending: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    for local, t in module.state_dict().items():
        name = f"{component}.{_canon_local(component, local)}"
        ref = to_file_ref(name, layout)
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if ref.rows is None:
            yield ref.key, ref.to_file(t)
            continue
        parts = pending.setdefault(ref.key, {})
        parts[ref.rows] = t
        if len(parts) == 3:
            order = sorted(parts)
            if order[0][0] != 0 or any(a[1] != b[0] for a, b in zip(order, order[1:])):
                raise FormatError(f"q/k/v slices of {ref.key!r} do not tile it: {order}")
            yield ref.key, torch.cat([parts[r] for r in order], 0)
            del pending[ref.key]
    if pending:
        raise FormatError(f"incomplete q/k/v projections for {sorted(pending)}")


def to_single_file(pipe_or_components, path: str | os.PathLike, family: str | None = None, *,
                   metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None,
                   extra_configs: Mapping[str, Any] | None = None,
                   extra_tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write a pipeline (or a dict of its components) as one LDM/SGM-layout ``.safetensors``.

    Component configs go to the metadata key ``lyco.configs`` (JSON, plus ``family`` and any
    ``extra_configs``) so ``load_pipeline`` can rebuild non-standard (e.g. tiny) models. ``dtype``
    casts floating tensors. ``extra_tensors`` are written verbatim after the mapped ones (e.g.
    unmapped keys carried over from a source checkpoint).
    """
    from lyco.models import configs as C

    comps = _components_of(pipe_or_components)
    if family is None:
        if comps.get("text_encoder_2") is not None:
            family = "sdxl"
        elif comps.get("unet") is not None:
            family = C.family_of_unet_config(comps["unet"].config)
        else:
            raise ConfigError("cannot tell the model family without a unet; pass family=")
    C.check_family(family)
    cfgs: dict[str, Any] = {}
    for comp in C.COMPONENTS[family]:
        if comps.get(comp) is not None:
            cfgs[comp] = component_config(comps[comp])
    if comps.get("scheduler") is not None:
        cfgs["scheduler"] = component_config(comps["scheduler"])
    cfgs["family"] = family
    cfgs.update(extra_configs or {})
    layout = single_file_layout(family, cfgs)
    meta = {"format": "pt", CONFIGS_METADATA_KEY: json.dumps(cfgs, sort_keys=True)}
    meta.update(metadata or {})

    def items():
        for comp in C.COMPONENTS[family]:
            if comps.get(comp) is not None:
                yield from _file_items(comp, comps[comp], layout, dtype)
        for k, t in (extra_tensors or {}).items():
            yield k, t

    return write_single_file(items(), path, meta)

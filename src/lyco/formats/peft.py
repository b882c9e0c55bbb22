"""diffusers / PEFT adapter files ↔ :class:`~lyco.adapter.Adapter`.

Reading (:func:`from_peft`) accepts every layout diffusers and PEFT have written for SD models:

* diffusers LoRA files: ``unet.<path>.lora_A.weight`` / ``lora_B.weight``, ``text_encoder.…``,
  ``text_encoder_2.…`` (with or without ``text_model.`` — recent transformers flatten CLIP);
  DoRA ``lora_magnitude_vector``; the LoraConfig kwargs in the header key ``lora_adapter_metadata``
  (JSON, keys prefixed ``unet.``/``text_encoder.``…).
* older diffusers layouts: ``.lora.down/up.weight``, ``.lora_linear_layer.down/up.weight``,
  attention-processor names (``attn1.processor.to_q_lora.down.weight``, ``to_out_lora`` →
  ``to_out.0`` in the UNet, ``q_proj``…``out_proj`` in CLIP), and ``network_alphas``-style
  ``<module>.alpha`` tensors (kohya meaning: scale = alpha / rank).
* PEFT model state dicts: ``base_model.model.<path>.…``, adapter names (``lora_A.default.weight``,
  ``hada_w1_a.default``), PEFT LoHa (``hada_*``) and LoKr (``lokr_*``) with their config.

Scales are converted to the house convention (γ = alpha / rank, ``alpha`` a 0-d tensor):

* LoRA: PEFT scale = ``lora_alpha/r`` (or ``/√r`` with ``use_rslora``), per module through
  ``rank_pattern``/``alpha_pattern`` (keys are regexes matched as PEFT does: ``(.*\\.)?(key)$``,
  first match wins); we store ``alpha = scale·rank``. No alpha information ⇒ ``alpha = rank``.
* LoHa: PEFT scale = ``alpha/r`` — the same meaning, stored as is.
* LoKr: PEFT scale is ``alpha/r`` **always**; LyCORIS (and A1111/ComfyUI) use scale 1 when both
  Kronecker factors are full. For that case the PEFT scale is folded into ``lokr_w1`` so ΔW is
  unchanged; otherwise ``alpha = scale·rank`` with rank read from ``lokr_w1_b``/``lokr_w2_b``.
* DoRA ``lora_magnitude_vector`` (PEFT: Linear ``(out,)``, Conv ``(1, out, 1, 1)``) becomes the
  output-axis ``dora_scale`` ``(out, 1, …)``.

Writing (:func:`to_peft`) produces diffusers' LoRA format: keys ``<component>.<path>.lora_A.weight``
/ ``lora_B.weight`` (+ ``lora_magnitude_vector`` for DoRA), header ``format: pt`` and
``lora_adapter_metadata`` holding a LoraConfig per component such that ``pipe.load_lora_weights``
builds every module with ``lora_alpha/r == alpha/rank`` (``rank_pattern``/``alpha_pattern`` name the
modules that differ from the most common rank/alpha; ``use_rslora`` is always false because our
``alpha`` already contains the √r of rs-LoRA). Loaders that ignore that header (ComfyUI, dicts passed
to diffusers) use scale 1: ``bake_scale=True`` folds γ into ``lora_B`` for them. Only LoRA/LoCon
without a Tucker core fits this format; others raise :class:`~lyco.errors.FormatError` (convert them
to LoRA by SVD first).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, Iterable, Mapping

import torch

from ..adapter import Adapter, ModuleAdapter, split_name
from ..errors import FormatError, UnknownKeys
from . import metadata as md

SD_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
PEFT_MODEL_PREFIX = "base_model.model."
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_", "oft_unet_")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

_ADAPTER = r"(?:\.[A-Za-z0-9_\-]+)?"  # optional PEFT adapter name, e.g. ".default"

# (regex on the whole key, role, style). The module name is group "m".
_ROLE_PATTERNS: list[tuple[re.Pattern, str, str]] = [
    (re.compile(rf"^(?P<m>.+)\.lora_A{_ADAPTER}\.weight$"), "down", "peft"),
    (re.compile(rf"^(?P<m>.+)\.lora_B{_ADAPTER}\.weight$"), "up", "peft"),
    (re.compile(rf"^(?P<m>.+)\.lora_B{_ADAPTER}\.bias$"), "up_bias", "peft"),
    (re.compile(rf"^(?P<m>.+)\.lora_A{_ADAPTER}\.bias$"), "down_bias", "peft"),
    (re.compile(rf"^(?P<m>.+)\.lora_magnitude_vector{_ADAPTER}(?:\.weight)?$"), "magnitude", "peft"),
    (re.compile(r"^(?P<m>.+)\.lora_linear_layer\.down\.weight$"), "down", "dotted"),
    (re.compile(r"^(?P<m>.+)\.lora_linear_layer\.up\.weight$"), "up", "dotted"),
    (re.compile(r"^(?P<m>.+)\.lora\.down\.weight$"), "down", "dotted"),
    (re.compile(r"^(?P<m>.+)\.lora\.up\.weight$"), "up", "dotted"),
    (re.compile(r"^(?P<m>.+)_lora\.down\.weight$"), "down", "processor"),
    (re.compile(r"^(?P<m>.+)_lora\.up\.weight$"), "up", "processor"),
    (re.compile(rf"^(?P<m>.+)\.(?P<r>{'|'.join(LOHA_KEYS)}){_ADAPTER}$"), "loha", "peft"),
    (re.compile(rf"^(?P<m>.+)\.(?P<r>{'|'.join(LOKR_KEYS)}){_ADAPTER}$"), "lokr", "peft"),
]
# module-name endings that carry no module of their own (alpha keys of the older layouts)
_ALPHA_TAILS = ((".lora_linear_layer", "dotted"), (".lora", "dotted"), ("_lora", "processor"))

_TE_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding",
               "add_embedding", "conv_norm_out", "class_embedding", "encoder_hid_proj")
_TE_ROOTS = ("text_model", "encoder", "embeddings", "final_layer_norm")


# --------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------


def _split_role(key: str) -> tuple[str, str, str] | None:
    """``(raw module name, role, style)`` for a key, or None when it is not an adapter key."""
    if key.endswith(".alpha"):
        m = key[: -len(".alpha")]
        sub = _split_role(m)  # "…to_q_lora.down.weight.alpha" (diffusers' network_alphas names)
        if sub is not None and sub[1] in ("down", "up"):
            return sub[0], "alpha", sub[2]
        for tail, style in _ALPHA_TAILS:
            if m.endswith(tail):
                return m[: -len(tail)], "alpha", style
        return m, "alpha", "peft"
    for pat, role, style in _ROLE_PATTERNS:
        g = pat.match(key)
        if g:
            if role in ("loha", "lokr"):
                role = g.group("r")
            return g.group("m"), role, style
    return None


def _guess_component(path: str) -> str:
    root = path.split(".", 1)[0]
    if root in _UNET_ROOTS:
        return "unet"
    if root in _TE_ROOTS:
        return "text_encoder"
    return "model"


def _split_component(raw: str, component: str | None) -> tuple[str, str]:
    path = raw
    if path.startswith(PEFT_MODEL_PREFIX):
        path = path[len(PEFT_MODEL_PREFIX):]
    head, _, rest = path.partition(".")
    if head in SD_COMPONENTS and rest:
        return head, rest
    return (component or _guess_component(path)), path


def _canonical_path(comp: str, path: str, style: str) -> str:
    parts = [p for p in path.split(".") if p != "processor"]
    if style == "processor" and parts:
        last = parts[-1]
        if comp in ("text_encoder", "text_encoder_2"):
            parts[-1] = _TE_ATTN.get(last, last)
    path = ".".join(parts)
    if comp == "unet" and (path.endswith(".to_out") or path == "to_out"):
        path += ".0"  # to_out is a ModuleList; its Linear is to_out.0
    if comp in ("text_encoder", "text_encoder_2") and path.split(".", 1)[0] in ("encoder", "embeddings",
                                                                                  "final_layer_norm"):
        path = "text_model." + path
    return path


def is_peft_state_dict(keys: Iterable[str]) -> bool:
    """True for diffusers/PEFT-layout adapter keys (dotted module paths), False for kohya/LyCORIS ones."""
    keys = list(keys)
    if not keys or any(k.startswith(KOHYA_PREFIXES) for k in keys):
        return False
    hits = 0
    for k in keys:
        parsed = _split_role(k)
        if parsed is None:
            continue
        raw, role, _ = parsed
        if role == "alpha":
            continue
        if role.startswith(("hada_", "lokr_")) and "." not in raw:
            continue  # a flat kohya-style name, not a dotted module path
        hits += 1
    return hits > 0


# --------------------------------------------------------------------------------------
# Config (LoraConfig / LoHaConfig / LoKrConfig kwargs)
# --------------------------------------------------------------------------------------


def _parse_adapter_metadata(metadata: Mapping[str, str] | None, source: str | None) -> dict | None:
    if not metadata or ADAPTER_METADATA_KEY not in metadata:
        return None
    raw = metadata[ADAPTER_METADATA_KEY]
    try:
        cfg = json.loads(raw)
    except ValueError as e:
        raise FormatError(f"header entry is not valid JSON ({e})", file=source, key=ADAPTER_METADATA_KEY) from None
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise FormatError(f"header entry is a JSON {type(cfg).__name__}; expected an object",
                          file=source, key=ADAPTER_METADATA_KEY)
    return cfg


def _split_config(cfg: Mapping[str, Any] | None, components: Iterable[str]) -> dict[str, dict]:
    """Per-component config: keys ``"<component>.<field>"`` (diffusers) or a plain config for all."""
    if not cfg:
        return {}
    comps = sorted(set(components) | set(SD_COMPONENTS), key=len, reverse=True)
    per: dict[str, dict] = {}
    plain: dict = {}
    for k, v in cfg.items():
        for c in comps:
            if k.startswith(c + "."):
                per.setdefault(c, {})[k[len(c) + 1:]] = v
                break
        else:
            plain[k] = v
    out = {c: dict(plain) for c in components} if plain else {}
    for c, d in per.items():
        out.setdefault(c, {}).update(d)
    return out


def _pattern_value(patterns: Mapping[str, Any] | None, names: list[str], source: str | None, field: str):
    """PEFT's pattern lookup: first key whose regex ``(.*\\.)?(key)$`` matches one of ``names``."""
    if not patterns:
        return None
    if not isinstance(patterns, Mapping):
        raise FormatError(f"{field} is a {type(patterns).__name__}; expected an object", file=source,
                          key=ADAPTER_METADATA_KEY)
    for key, val in patterns.items():
        try:
            rx = re.compile(rf"(.*\.)?({key})$")
        except re.error as e:
            raise FormatError(f"{field} key {key!r} is not a valid regular expression ({e})", file=source,
                              key=ADAPTER_METADATA_KEY) from None
        if any(rx.match(n) for n in names):
            return val
    return None


def _as_number(v, what: str, source: str | None) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise FormatError(f"{what} is {v!r}; expected a number", file=source, key=ADAPTER_METADATA_KEY) from None
    if not math.isfinite(f):
        raise FormatError(f"{what} is {v!r}; expected a finite number", file=source, key=ADAPTER_METADATA_KEY)
    return f


def _peft_scale(cfg: Mapping[str, Any], comp: str, path: str, kind: str,
                source: str | None) -> tuple[float, float]:
    """``(r, scale)`` PEFT uses for this module: scale = alpha/r (or alpha/√r with rs-LoRA)."""
    names = [path]
    if path.startswith("text_model."):
        names.append(path[len("text_model."):])
    r = _pattern_value(cfg.get("rank_pattern"), names, source, "rank_pattern")
    if r is None:
        r = cfg.get("r", 8)
    r = _as_number(r, f"{comp} r", source)
    if r <= 0:
        raise FormatError(f"{comp} rank r = {r:g}; expected a positive number", file=source,
                          key=ADAPTER_METADATA_KEY)
    a = _pattern_value(cfg.get("alpha_pattern"), names, source, "alpha_pattern")
    if a is None:
        if kind == "lora":
            a = cfg.get("lora_alpha", cfg.get("alpha", 8))
        else:
            a = cfg.get("alpha", cfg.get("lora_alpha", 8))
    a = _as_number(a, f"{comp} alpha", source)
    rs = kind == "lora" and bool(cfg.get("use_rslora", False))
    return r, a / (math.sqrt(r) if rs else r)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _alpha_tensor(x: float) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float32)


def _scaled(t: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """``t·s`` computed in fp32 (fp64 for fp64 tensors) and cast back once."""
    wide = torch.float64 if t.dtype == torch.float64 else torch.float32
    s = s.to(wide) if isinstance(s, torch.Tensor) else s
    return (t.to(wide) * s).to(t.dtype)


def from_peft(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
              config: Mapping[str, Any] | None = None, component: str | None = None,
              source: str | None = None) -> Adapter:
    """Decode a diffusers/PEFT state dict into an :class:`Adapter` (canonical names, house scales).

    ``config``: LoraConfig/LoHaConfig/LoKrConfig kwargs (e.g. a PEFT ``adapter_config.json``),
    plain or component-prefixed; it overrides the header's ``lora_adapter_metadata``.
    ``component``: the component for keys without one (``base_model.model.…`` or bare paths);
    guessed from the path when not given (``model`` for unknown models).
    """
    if component is not None and component not in ("unet", "text_encoder", "text_encoder_2", "model"):
        raise FormatError(f"unknown component {component!r}", file=source)
    metadata = dict(metadata or {})
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    origin: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        parsed = _split_role(key)
        if parsed is None:
            unknown.append(key)
            continue
        raw, role, style = parsed
        comp, path = _split_component(raw, component)
        name = f"{comp}.{_canonical_path(comp, path, style)}"
        slot = grouped.setdefault(name, {})
        if role in slot:
            raise FormatError(f"two keys give the {role!r} tensor of module {name!r}: "
                              f"{origin[name][role]!r} and {key!r}", file=source, key=key)
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"value is a {type(t).__name__}; expected a tensor", file=source, key=key)
        slot[role] = t
        origin.setdefault(name, {})[role] = key
    if unknown:
        raise UnknownKeys(unknown, file=source, what="keys that are not diffusers/PEFT adapter tensors",
                          hint="expected <module>.lora_A.weight / lora_B.weight (or .lora.down/up, "
                               "hada_*, lokr_*, .alpha)")

    cfg_all = config if config is not None else _parse_adapter_metadata(metadata, source)
    comps = {split_name(n)[0] for n in grouped}
    cfgs = _split_config(cfg_all, comps)

    modules: dict[str, ModuleAdapter] = {}
    any_dora = False
    for name in sorted(grouped):
        slot = grouped[name]
        comp, path = split_name(name)
        cfg = cfgs.get(comp)
        keys = origin[name]
        roles = set(slot)
        lora_roles = roles & {"down", "up", "up_bias", "down_bias", "magnitude"}
        loha_roles = roles & set(LOHA_KEYS)
        lokr_roles = roles & set(LOKR_KEYS)
        kinds = [k for k, r in (("lora", lora_roles), ("loha", loha_roles), ("lokr", lokr_roles)) if r]
        if len(kinds) != 1:
            what = " and ".join(kinds) if kinds else "only an alpha"
            raise FormatError(f"module {name!r} has {what} tensors ({', '.join(sorted(keys.values()))}); "
                              f"expected exactly one adapter type", file=source)
        kind = kinds[0]
        if kind == "lora":
            modules[name] = _lora_module(name, slot, keys, cfg, comp, path, source)
            any_dora = any_dora or "dora_scale" in modules[name].tensors
        elif kind == "loha":
            modules[name] = _loha_module(name, slot, keys, cfg, comp, path, source)
        else:
            modules[name] = _lokr_module(name, slot, keys, cfg, comp, path, source)

    out_meta = {k: v for k, v in metadata.items() if k not in ("format", ADAPTER_METADATA_KEY)}
    md.set_lyco(out_meta, md.LYCO_SOURCE_FORMAT, "peft")
    if any_dora:
        md.set_lyco(out_meta, md.LYCO_DORA_AXIS, "output")
    family = "sdxl" if "text_encoder_2" in comps else md.family_from_metadata(metadata)
    return Adapter(modules, out_meta, family, source)


def _need(slot, role, name, keys, source, what):
    if role not in slot:
        raise FormatError(f"module {name!r} has {', '.join(sorted(keys.values()))} but no {what}",
                          file=source)
    return slot[role]


def _file_alpha(slot, keys, name, source) -> float | None:
    a = slot.get("alpha")
    if a is None:
        return None
    if a.numel() != 1:
        raise FormatError(f"alpha of module {name!r} has shape {tuple(a.shape)}; expected a scalar",
                          file=source, key=keys["alpha"])
    return float(a.reshape(-1)[0])


def _lora_module(name, slot, keys, cfg, comp, path, source) -> ModuleAdapter:
    if "up_bias" in slot or "down_bias" in slot:
        k = keys.get("up_bias") or keys.get("down_bias")
        raise FormatError(f"module {name!r}: LoRA bias terms (PEFT lora_bias=True) are not supported",
                          file=source, key=k)
    down = _need(slot, "down", name, keys, source, "lora_A (down) tensor")
    up = _need(slot, "up", name, keys, source, "lora_B (up) tensor")
    if down.dim() < 2 or up.dim() < 2 or up.shape[1] != down.shape[0]:
        raise FormatError(f"module {name!r}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} do not "
                          f"chain; expected lora_A (r, in, …) and lora_B (out, r, …)", file=source, key=keys["up"])
    if any(d != 1 for d in up.shape[2:]):
        raise FormatError(f"module {name!r}: lora_B {tuple(up.shape)} has a spatial kernel; expected 1×1",
                          file=source, key=keys["up"])
    rank = int(down.shape[0])
    alpha = _file_alpha(slot, keys, name, source)
    if alpha is None:
        if cfg:
            r_cfg, scale = _peft_scale(cfg, comp, path, "lora", source)
            if int(r_cfg) != rank:
                raise FormatError(f"module {name!r}: the config gives rank {r_cfg:g} but lora_A has rank {rank}",
                                  file=source, key=keys["down"])
            alpha = scale * rank
        else:
            alpha = float(rank)  # diffusers/PEFT convention without alphas: scale 1
    t = {"lora_down.weight": down, "lora_up.weight": up, "alpha": _alpha_tensor(alpha)}
    if "magnitude" in slot:
        m = slot["magnitude"]
        out = int(up.shape[0])
        if m.numel() != out:
            raise FormatError(f"module {name!r}: lora_magnitude_vector {tuple(m.shape)} has {m.numel()} values; "
                              f"expected one per output channel ({out})", file=source, key=keys["magnitude"])
        t["dora_scale"] = m.reshape((out,) + (1,) * (up.dim() - 1))
    return ModuleAdapter("lora", t)


def _loha_module(name, slot, keys, cfg, comp, path, source) -> ModuleAdapter:
    for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
        _need(slot, k, name, keys, source, k)
    if ("hada_t1" in slot) != ("hada_t2" in slot):
        raise FormatError(f"module {name!r} has only one of hada_t1/hada_t2", file=source)
    t = {k: slot[k] for k in LOHA_KEYS if k in slot}
    rank = int(t["hada_w1_b"].shape[0])
    alpha = _file_alpha(slot, keys, name, source)
    if alpha is None:
        if cfg:
            _r, scale = _peft_scale(cfg, comp, path, "loha", source)
            alpha = scale * rank
        else:
            alpha = float(rank)
    t["alpha"] = _alpha_tensor(alpha)
    return ModuleAdapter("loha", t)


def _lokr_module(name, slot, keys, cfg, comp, path, source) -> ModuleAdapter:
    t = {k: slot[k] for k in LOKR_KEYS if k in slot}
    w1_full = "lokr_w1" in t
    w2_full = "lokr_w2" in t
    if not w1_full and not ("lokr_w1_a" in t and "lokr_w1_b" in t):
        raise FormatError(f"module {name!r} has neither lokr_w1 nor lokr_w1_a + lokr_w1_b", file=source)
    if not w2_full and not ("lokr_w2_a" in t and "lokr_w2_b" in t):
        raise FormatError(f"module {name!r} has neither lokr_w2 nor lokr_w2_a + lokr_w2_b", file=source)
    alpha = _file_alpha(slot, keys, name, source)
    if alpha is not None:  # already the kohya/LyCORIS meaning
        t["alpha"] = _alpha_tensor(alpha)
        return ModuleAdapter("lokr", t)
    r_cfg, scale = (_peft_scale(cfg, comp, path, "lokr", source) if cfg else (None, 1.0))
    if w1_full and w2_full:
        # LyCORIS: scale 1 with two full factors; PEFT: alpha/r. Fold PEFT's scale into w1.
        if scale != 1.0:
            t["lokr_w1"] = _scaled(t["lokr_w1"], scale)
        t["alpha"] = _alpha_tensor(r_cfg if r_cfg else 1.0)  # ignored by every loader here
    else:
        rank = int(t["lokr_w1_b"].shape[0]) if "lokr_w1_b" in t else int(t["lokr_w2_b"].shape[0])
        t["alpha"] = _alpha_tensor(scale * rank)
    return ModuleAdapter("lokr", t)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

_LORA_WRITABLE = {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale", "scalar"}


def _gamma(t: Mapping[str, torch.Tensor], rank: int) -> float:
    a = t.get("alpha")
    if a is None or a.numel() == 0:
        return 1.0
    a = float(a.reshape(-1)[0])
    if a == 0 or not math.isfinite(a):
        return 1.0
    return a / rank


def _num(x: float):
    return int(x) if float(x).is_integer() and abs(x) < 2 ** 53 else float(x)


def _export_lora(name: str, m: ModuleAdapter, source: str | None) -> dict[str, torch.Tensor]:
    algo = m.algo.lower().replace("_", "-")
    if algo not in ("lora", "locon", "dylora"):
        raise FormatError(f"module {name!r} is {m.algo!r}; the diffusers/PEFT LoRA format holds only "
                          f"LoRA/LoCon. Convert it to LoRA first (lyco convert --to lora, an SVD)",
                          file=source)
    t = dict(m.tensors)
    if "lora_mid.weight" in t:
        raise FormatError(f"module {name!r} is a LoCon with a Tucker core (lora_mid.weight), which "
                          f"diffusers cannot load. Convert it to plain LoRA first (lyco convert --to lora)",
                          file=source)
    extra = set(t) - _LORA_WRITABLE
    if extra:
        raise FormatError(f"module {name!r} has tensors {sorted(extra)} that the diffusers/PEFT LoRA "
                          f"format cannot hold", file=source)
    if "scalar" in t:
        t["lora_up.weight"] = _scaled(t["lora_up.weight"], t.pop("scalar"))
    return t


def _magnitude(name: str, ds: torch.Tensor, up: torch.Tensor, down: torch.Tensor, axis_hint: str | None,
               source: str | None) -> torch.Tensor:
    out = int(up.shape[0])
    in_ = int(down.shape[1])
    nd = up.dim()
    is_output = ds.dim() >= 1 and ds.shape[0] == out and ds.numel() == out
    is_input = ds.dim() >= 2 and ds.shape[0] == 1 and ds.shape[1] == in_ and ds.numel() == in_
    if is_output and is_input:  # a 1-wide layer: the shape cannot tell
        is_output = axis_hint != "input"
    if not is_output:
        raise FormatError(f"module {name!r}: dora_scale {tuple(ds.shape)} is normalised per input channel; "
                          f"PEFT/diffusers DoRA (lora_magnitude_vector) is per output channel. This DoRA "
                          f"cannot be written in diffusers format", file=source)
    flat = ds.reshape(out)
    if nd == 2:
        return flat.contiguous()
    return flat.reshape((1, out) + (1,) * (nd - 2)).contiguous()


def _config_name(comp: str, path: str) -> str:
    if comp in ("text_encoder", "text_encoder_2") and path.startswith("text_model."):
        # diffusers strips "text_model." from the keys for flattened CLIP models but not from the
        # config; a name without it matches both layouts through PEFT's suffix matching.
        return path[len("text_model."):]
    return path


def to_peft(adapter: Adapter, *, bake_scale: bool = False,
            include_metadata: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Encode an :class:`Adapter` as a diffusers LoRA state dict and its header.

    ``bake_scale``: fold γ = alpha/rank into ``lora_B`` and write ``lora_alpha == r`` for every
    module, for loaders that ignore ``lora_adapter_metadata`` (ComfyUI, diffusers given a dict).
    ``include_metadata``: also copy the adapter's own metadata (``ss_*``, ``modelspec.*`` …; the
    ``sshs_*`` hashes, which describe another serialisation, are left out).
    """
    source = adapter.source
    comps = adapter.components()
    if "model" in comps and len(comps) > 1:
        raise FormatError("a generic 'model' adapter cannot be mixed with SD components in one diffusers file",
                          file=source)
    axis_hint = md.get_lyco(adapter.metadata, md.LYCO_DORA_AXIS)
    tensors: dict[str, torch.Tensor] = {}
    per_comp: dict[str, list[tuple[str, int, float, bool]]] = {}
    for name in sorted(adapter.modules):
        m = adapter.modules[name]
        comp, path = split_name(name)
        if not path:
            raise FormatError(f"module name {name!r} has no path after its component", file=source)
        t = _export_lora(name, m, source)
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        if down.dim() < 2 or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise FormatError(f"module {name!r}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} "
                              f"do not chain", file=source)
        rank = int(down.shape[0])
        gamma = _gamma(t, rank)
        if bake_scale and gamma != 1.0:
            up = _scaled(up, gamma)
            gamma = 1.0
        prefix = PEFT_MODEL_PREFIX + path if comp == "model" else name
        tensors[f"{prefix}.lora_A.weight"] = down
        tensors[f"{prefix}.lora_B.weight"] = up
        dora = "dora_scale" in t
        if dora:
            tensors[f"{prefix}.lora_magnitude_vector"] = _magnitude(name, t["dora_scale"], up, down, axis_hint,
                                                                    source)
        per_comp.setdefault(comp, []).append((_config_name(comp, path), rank, gamma * rank, dora))

    config: dict[str, Any] = {}
    for comp, rows in per_comp.items():
        doras = {d for *_, d in rows}
        if len(doras) > 1:
            with_d = [p for p, *_, d in rows if d][:3]
            raise FormatError(f"component {comp!r} mixes DoRA and plain LoRA modules (DoRA e.g. {with_d}); "
                              f"a PEFT LoraConfig applies use_dora to every module of a component",
                              file=source)
        r = Counter(rk for _, rk, _, _ in rows).most_common(1)[0][0]
        alpha = Counter(a for _, _, a, _ in rows).most_common(1)[0][0]
        cfg = {
            "r": r,
            "lora_alpha": _num(alpha),
            "target_modules": sorted(p for p, *_ in rows),
            "rank_pattern": {p: rk for p, rk, _, _ in rows if rk != r},
            "alpha_pattern": {p: _num(a) for p, _, a, _ in rows if a != alpha},
            "use_dora": doras == {True},
            "use_rslora": False,
            "lora_dropout": 0.0,
            "bias": "none",
        }
        if comp == "model":
            config.update(cfg)
        else:
            config.update({f"{comp}.{k}": v for k, v in cfg.items()})

    meta: dict[str, str] = {}
    if include_metadata:
        meta.update({k: v for k, v in adapter.metadata.items()
                     if isinstance(v, str) and not k.startswith("sshs_")
                     and k not in ("format", ADAPTER_METADATA_KEY)})
    if any(d for rows in per_comp.values() for *_, d in rows):
        md.set_lyco(meta, md.LYCO_DORA_AXIS, "output")
    if adapter.family in md.FAMILIES:
        md.set_lyco(meta, md.LYCO_FAMILY, adapter.family)
    md.stamp_version(meta)
    meta["format"] = "pt"
    meta[ADAPTER_METADATA_KEY] = json.dumps(config, sort_keys=True)
    return tensors, meta


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def load(path, *, config: Mapping[str, Any] | None = None, component: str | None = None) -> Adapter:
    """Read a diffusers/PEFT ``.safetensors`` (or legacy ``.bin``) file into an Adapter."""
    from .safetensors_io import load as _load
    tensors, meta = _load(path)
    return from_peft(tensors, meta, config=config, component=component, source=str(path))


def save(adapter: Adapter, path, *, overwrite: bool = False, bake_scale: bool = False) -> None:
    """Write an Adapter as a diffusers LoRA ``.safetensors`` file (atomically)."""
    from .safetensors_io import save_tensors
    tensors, meta = to_peft(adapter, bake_scale=bake_scale)
    save_tensors(tensors, path, meta, overwrite=overwrite)

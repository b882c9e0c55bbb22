"""Which layers get adapters: presets are data, validated (unknown keys are errors).

A preset lists, per component (``unet``, ``text_encoder`` — also used for ``text_encoder_2`` —
and ``model`` for any other torch module):

* ``target_modules``: block class names; every adaptable leaf inside such a block is targeted
  (kohya/LyCORIS semantics: ``Transformer2DModel`` targets its attention, FF and proj layers);
* ``target_names``: patterns matched against the **full dotted canonical path** of a layer or of
  one of its ancestors: a glob (``*.to_k``, ``down_blocks.*``) or an anchored regex written
  ``re:<regex>`` (full match — no accidental prefix matches, unlike LyCORIS's ``re.match``);
* ``exclude``: patterns of the same kind; an excluded path or ancestor is never targeted.

Preset-wide: ``include_conv`` (k×k convs get the conv rank; without it they are skipped, while
1×1 convs count as linear, like kohya), ``include_norm`` (LayerNorm/GroupNorm get the ``norm``
algorithm). ``overrides``: a list of ``{pattern, [component], algo?, rank?, alpha?, <options>}``
applied in order (later wins), options validated by the algorithm they end up with.

LyCORIS preset TOML keys (``unet_target_module``, ``text_encoder_target_name``, ``enable_conv``,
``module_algo_map``, ``name_algo_map``, ``exclude_name``, ``use_fnmatch`` …) are accepted and
translated.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

COMPONENT_KEYS = ("unet", "text_encoder", "model")
_RULE_KEYS = {"target_modules", "target_names", "exclude"}
_TOP_KEYS = {"name", "description", "include_conv", "include_norm", "overrides", *COMPONENT_KEYS}
_LYCORIS_KEYS = {"enable_conv", "target_module", "target_name", "module_algo_map", "name_algo_map",
                 "lora_prefix", "use_fnmatch", "unet_target_module", "unet_target_name",
                 "text_encoder_target_module", "text_encoder_target_name", "exclude_name"}


@dataclass
class Rules:
    target_modules: list[str] = field(default_factory=list)
    target_names: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.target_modules or self.target_names)


@dataclass
class Override:
    pattern: str
    settings: dict[str, Any]
    component: str | None = None
    module_class: str | None = None


@dataclass
class Preset:
    name: str
    rules: dict[str, Rules]
    include_conv: bool = True
    include_norm: bool = False
    overrides: list[Override] = field(default_factory=list)
    description: str = ""

    def rules_for(self, component: str) -> Rules:
        key = "text_encoder" if component.startswith("text_encoder") else component
        return self.rules.get(key, Rules())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], name: str | None = None) -> "Preset":
        """Validate and build; any malformed value is a :class:`ConfigError` naming the preset."""
        try:
            return cls._from_dict(d, name)
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as e:
            raise ConfigError(f"preset {name!r}: malformed value ({type(e).__name__}: {e}); "
                              "see lyco.presets for the accepted layout") from None

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any], name: str | None = None) -> "Preset":
        if not isinstance(d, Mapping):
            raise ConfigError(f"preset {name!r}: expected a table, got {type(d).__name__}")
        d = dict(d)
        if set(d) & _LYCORIS_KEYS:
            d = _from_lycoris(d)
        unknown = set(d) - _TOP_KEYS
        if unknown:
            raise ConfigError(f"preset {name or d.get('name')!r}: unknown key(s) {sorted(unknown)}; "
                              f"accepted: {sorted(_TOP_KEYS)}")
        rules = {}
        for comp in COMPONENT_KEYS:
            if comp in d:
                r = d[comp]
                if not isinstance(r, Mapping):
                    raise ConfigError(f"preset {name!r}: [{comp}] must be a table")
                bad = set(r) - _RULE_KEYS
                if bad:
                    raise ConfigError(f"preset {name!r}: [{comp}] unknown key(s) {sorted(bad)}; "
                                      f"accepted: {sorted(_RULE_KEYS)}")
                rules[comp] = Rules(*[_str_list(r.get(k, []), f"{comp}.{k}") for k in
                                      ("target_modules", "target_names", "exclude")])
        overrides = []
        ovr = d.get("overrides", [])
        if not isinstance(ovr, (list, tuple)):
            raise ConfigError(f"preset {name!r}: 'overrides' must be a list of tables")
        for i, o in enumerate(ovr):
            if not isinstance(o, Mapping):
                raise ConfigError(f"preset {name!r}: override #{i} must be a table, got {type(o).__name__}")
            o = dict(o)
            if "pattern" not in o and "module_class" not in o:
                raise ConfigError(f"preset {name!r}: override #{i} needs 'pattern' or 'module_class'")
            pat = o.pop("pattern", "*")
            comp = o.pop("component", None)
            mcls = o.pop("module_class", None)
            for what, v in (("pattern", pat), ("component", comp), ("module_class", mcls)):
                if v is not None and not isinstance(v, str):
                    raise ConfigError(f"preset {name!r}: override #{i} {what} must be a string")
            validate_pattern(pat)
            overrides.append(Override(pat, o, comp, mcls))
        for k in ("include_conv", "include_norm"):
            if k in d and not isinstance(d[k], bool):
                raise ConfigError(f"preset {name!r}: {k} must be true or false")
        return cls(name or d.get("name", "custom"), rules, d.get("include_conv", True),
                   d.get("include_norm", False), overrides, d.get("description", ""))


def _str_list(v, what) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"preset {what}: expected a list of strings, got {v!r}")
    for p in v:
        validate_pattern(p)
    return list(v)


def validate_pattern(p: str) -> None:
    if p.startswith("re:"):
        try:
            re.compile(p[3:])
        except re.error as e:
            raise ConfigError(f"bad regular expression {p!r}: {e}") from None


def match(pattern: str, path: str) -> bool:
    """A pattern against a full dotted path: ``re:`` anchored regex, else glob, else equality."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return path == pattern or fnmatch.fnmatchcase(path, pattern)


def match_path_or_ancestor(pattern: str, path: str) -> bool:
    parts = path.split(".")
    return any(match(pattern, ".".join(parts[:i])) for i in range(len(parts), 0, -1))


def _from_lycoris(d: dict) -> dict:
    """Translate a LyCORIS preset dict (config_sdk keys) into ours."""
    out: dict[str, Any] = {"name": d.pop("name", "lycoris-preset")}
    unknown = set(d) - _LYCORIS_KEYS - _TOP_KEYS
    if unknown:
        raise ConfigError(f"LyCORIS-style preset: unknown key(s) {sorted(unknown)}")
    glob = d.pop("use_fnmatch", False)

    def pats(v):
        v = [v] if isinstance(v, str) else list(v or [])
        # LyCORIS matches names by equality, else re.match (prefix-anchored), else fnmatch when enabled
        return [p if glob else f"re:{p}.*" if any(c in p for c in "*?[]().^$+|\\") else p for p in v]

    if "enable_conv" in d:
        out["include_conv"] = bool(d.pop("enable_conv"))
    unet = {"target_modules": list(d.pop("unet_target_module", [])), "target_names": pats(d.pop("unet_target_name", []))}
    te = {"target_modules": list(d.pop("text_encoder_target_module", [])),
          "target_names": pats(d.pop("text_encoder_target_name", []))}
    model = {"target_modules": list(d.pop("target_module", [])), "target_names": pats(d.pop("target_name", []))}
    excl = pats(d.pop("exclude_name", []))
    overrides = []
    for cls_name, cfg in dict(d.pop("module_algo_map", {})).items():
        cfg = _lycoris_override(cfg)
        overrides.append({"module_class": cls_name, **cfg})
        for r in (unet, te, model):
            if cls_name not in r["target_modules"]:
                r["target_modules"].append(cls_name)
    for pat, cfg in dict(d.pop("name_algo_map", {})).items():
        overrides.append({"pattern": pats([pat])[0], **_lycoris_override(cfg)})
    d.pop("lora_prefix", None)
    for comp, r in (("unet", unet), ("text_encoder", te), ("model", model)):
        if r["target_modules"] or r["target_names"]:
            out[comp] = {**r, "exclude": list(excl)}
    if overrides:
        out["overrides"] = overrides
    out.update(d)
    return out


def _lycoris_override(cfg: Mapping[str, Any]) -> dict:
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"LyCORIS-style preset: algo map entries must be tables, got {type(cfg).__name__}")
    cfg = dict(cfg)
    if "dim" in cfg:
        cfg["rank"] = cfg.pop("dim")
    if "weight_decompose" in cfg:
        cfg["dora"] = cfg.pop("weight_decompose")
    if "dora_wd" in cfg:
        cfg["dora"] = cfg.pop("dora_wd")
    return cfg


# --------------------------------------------------------------------------------------
# Built-in presets (SD1.x / SD2.x / SDXL UNets, CLIP text encoders, any torch model)
# --------------------------------------------------------------------------------------

_TE_BLOCKS = ["CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"]
_UNET_CONV_BLOCKS = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]
_UNET_EXTRA_NAMES = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
_ALL_LAYERS = {"target_modules": ["Linear", "Conv1d", "Conv2d", "Conv3d"]}

BUILTIN: dict[str, dict[str, Any]] = {
    "attn-only": {
        "description": "attention projections only (UNet q/k/v/out, CLIP self-attention)",
        "include_conv": False,
        "unet": {"target_modules": ["Attention"]},
        "text_encoder": {"target_modules": ["CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2"]},
        "model": {"target_modules": ["Linear"]},
    },
    "attn-mlp": {
        "description": "kohya's LoRA default: every Linear/1×1 conv of the transformer blocks, CLIP attention+MLP",
        "include_conv": False,
        "unet": {"target_modules": ["Transformer2DModel"]},
        "text_encoder": {"target_modules": _TE_BLOCKS},
        "model": {"target_modules": ["Linear"]},
    },
    "full": {
        "description": "LyCORIS 'full': transformer + ResNet + sampler convs, conv_in/conv_out, time embedding, CLIP",
        "include_conv": True,
        "unet": {"target_modules": ["Transformer2DModel", *_UNET_CONV_BLOCKS], "target_names": _UNET_EXTRA_NAMES},
        "text_encoder": {"target_modules": _TE_BLOCKS},
        "model": _ALL_LAYERS,
    },
    "full-lin": {
        "description": "transformer + ResNet blocks without k×k convs (linear and 1×1 only), CLIP",
        "include_conv": False,
        "unet": {"target_modules": ["Transformer2DModel", "ResnetBlock2D"],
                 "target_names": ["time_embedding.linear_1", "time_embedding.linear_2"]},
        "text_encoder": {"target_modules": _TE_BLOCKS},
        "model": {"target_modules": ["Linear"]},
    },
    "unet-only": {
        "description": "'full' on the UNet only",
        "include_conv": True,
        "unet": {"target_modules": ["Transformer2DModel", *_UNET_CONV_BLOCKS], "target_names": _UNET_EXTRA_NAMES},
    },
    "unet-transformer-only": {
        "description": "UNet transformer blocks only, no text encoder",
        "include_conv": False,
        "unet": {"target_modules": ["Transformer2DModel"]},
    },
    "unet-convblock-only": {
        "description": "UNet ResNet/sampler blocks and conv_in/conv_out only",
        "include_conv": True,
        "unet": {"target_modules": _UNET_CONV_BLOCKS, "target_names": ["conv_in", "conv_out"]},
    },
    "ia3": {
        "description": "(IA)^3 as in its paper: keys, values (output side) and FF outputs (input side)",
        "include_conv": False,
        "unet": {"target_names": ["*.to_k", "*.to_v", "*.ff.net.2"]},
        "text_encoder": {"target_names": ["*.k_proj", "*.v_proj", "*.mlp.fc2"]},
        "overrides": [
            {"pattern": "*", "algo": "ia3"},
            {"pattern": "*.ff.net.2", "train_on_input": True},
            {"pattern": "*.mlp.fc2", "train_on_input": True},
        ],
    },
}


def get(preset: "str | Path | Mapping[str, Any] | Preset | None") -> Preset:
    if preset is None:
        preset = "attn-mlp"
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, Mapping):
        return Preset.from_dict(preset)
    s = str(preset)
    if s in BUILTIN:
        return Preset.from_dict(BUILTIN[s], name=s)
    p = Path(s)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"preset file {s!r} not found; built-in presets: {', '.join(BUILTIN)}")
        import tomllib
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"{s}: not valid TOML: {type(e).__name__}: {str(e)[:200]}") from None
        except OSError as e:
            raise ConfigError(f"{s}: cannot read preset file: {e.strerror}") from None
        return Preset.from_dict(data, name=p.stem)
    raise ConfigError(f"unknown preset {s!r}; built-in: {', '.join(BUILTIN)} (or a .toml file)")

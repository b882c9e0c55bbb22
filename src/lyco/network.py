"""Which layers get adapters, and the attached set of :class:`AdapterLayer` as one Network.

``Network.create`` puts a fresh (trainable) adapter on a model by preset and rules;
``Network.from_adapter`` attaches an :class:`~lyco.adapter.Adapter` read from a file.
Both accept a single module (generic ``lycoris_`` naming), a dict of components
(``unet``, ``text_encoder``, ``text_encoder_2``) or a diffusers pipeline.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from . import algorithms, naming, presets as presets_mod, siblings
from .adapter import TEXT_COMPONENTS, Adapter, ModuleAdapter, split_name
from .algorithms.base import LayerSpec, layer_kind
from .algorithms.dora import init_magnitude, wrap as dora_wrap
from .errors import ConfigError, FamilyMismatch, LycoError, ShapeMismatch, UnknownKeys
from .layer import AdapterLayer, LayerHost, _accum_dtype, check_fits

log = logging.getLogger("lyco")

_PIPE_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_DORA_KEYS = ("dora", "dora_wd", "weight_decompose")
# DoRA-only layer options (name → default), accepted by ``create`` next to ``dora``/``dora_axis`` and
# passed to every DoRA layer's ``AdapterLayer.opts``; ignored on layers without DoRA (an error
# when no layer has DoRA, a likely mistake):
#   dora_detach_norm — ‖W′‖ treated as a constant in backward (DoRA paper §4.3, PEFT's default; see
#                      algorithms/dora.py). Same forward, cheaper backward, other directional gradient.
_DORA_LAYER_OPTIONS: dict[str, Any] = {"dora_detach_norm": False}
_RESERVED = {"algo", "rank", "alpha", "dora", "dora_axis"}


# --------------------------------------------------------------------------------------
# Targets and families
# --------------------------------------------------------------------------------------


def resolve_target(target) -> dict[str, nn.Module]:
    """A module, a dict of components or a diffusers pipeline → {component: module}."""
    if isinstance(target, Mapping):
        comps = {k: v for k, v in target.items() if v is not None}
        bad = [k for k in comps if k not in (*_PIPE_COMPONENTS, "model")]
        if bad:
            raise ConfigError(f"unknown component name(s) {bad}; use unet, text_encoder, text_encoder_2 or model")
        for k, v in comps.items():
            if not isinstance(v, nn.Module):
                raise ConfigError(f"component {k!r} is a {type(v).__name__}, not a torch.nn.Module")
        return comps
    if isinstance(target, nn.Module):
        return {"model": target}
    comps = {k: getattr(target, k) for k in _PIPE_COMPONENTS if isinstance(getattr(target, k, None), nn.Module)}
    if comps:
        return comps
    raise ConfigError(f"cannot attach to a {type(target).__name__}: pass an nn.Module, a dict of components "
                      "or a diffusers pipeline")


def detect_family(components: Mapping[str, nn.Module]) -> str | None:
    """sd1 / sd2 / sdxl from the UNet config (cross-attention width, text_time embedding)."""
    unet = components.get("unet")
    if unet is None:
        te = components.get("text_encoder")
        if "text_encoder_2" in components:
            return "sdxl"
        if te is not None:
            hid = getattr(getattr(te, "config", None), "hidden_size", None)
            return {768: "sd1", 1024: "sd2"}.get(hid, "sd1")
        return None
    cfg = getattr(unet, "config", None)
    if cfg is None:
        return None
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    if get("addition_embed_type", None) == "text_time" or "text_encoder_2" in components:
        return "sdxl"
    cad = get("cross_attention_dim", None)
    if cad == 1024:
        return "sd2"
    if cad == 2048:
        return "sdxl"
    if get("use_linear_projection", False):
        return "sd2"  # SD 1.x always has 1×1-conv proj_in/out, SD 2.x Linear (tiny models too)
    return "sd1"


def _component_for(comp: str, comps: Mapping[str, nn.Module], adapter_comps: set[str]) -> str | None:
    if comp in comps:
        return comp
    if len(comps) == 1 and len(adapter_comps) == 1:
        return next(iter(comps))  # a single-component adapter onto a single module
    if comp == "model" and "unet" in comps and len(adapter_comps) == 1:
        return "unet"
    return None


# --------------------------------------------------------------------------------------
# Layer selection
# --------------------------------------------------------------------------------------


def _walk(root: nn.Module):
    """(path, module, ancestor class names incl. its own) for every module."""
    stack = [("", root, ())]
    while stack:
        path, mod, anc = stack.pop()
        classes = anc + (type(mod).__name__,)
        yield path, mod, classes
        for name, child in reversed(list(mod.named_children())):
            stack.append((f"{path}.{name}" if path else name, child, classes))


def select_layers(component: str, root: nn.Module, preset: presets_mod.Preset):
    """Yield (module path, canonical path, module, classes) of the layers a preset targets."""
    rules = preset.rules_for(component)
    if rules.empty:
        return
    text_root = component in TEXT_COMPONENTS and naming.is_text_model_root(root)
    for path, mod, classes in _walk(root):
        kind = layer_kind(mod)
        if kind is None or not path:
            continue
        canon = naming.TE_CLASS_PREFIX + path if text_root else path
        hit = any(c in rules.target_modules for c in classes) or any(
            presets_mod.match_path_or_ancestor(p, canon) for p in rules.target_names)
        if not hit or any(presets_mod.match_path_or_ancestor(p, canon) for p in rules.exclude):
            continue
        spec = LayerSpec.from_module(mod)
        if spec.is_norm and not preset.include_norm and not _named_explicitly(rules, canon):
            continue
        if spec.is_kxk_conv and not preset.include_conv:
            continue
        yield path, canon, mod, classes, spec


def _named_explicitly(rules, canon) -> bool:
    return any(presets_mod.match(p, canon) for p in rules.target_names)


def _settings_for(component: str, canon: str, classes, spec: LayerSpec, base: dict, conv: dict,
                  preset: presets_mod.Preset, overrides: list[presets_mod.Override]) -> dict:
    s = dict(base)
    if spec.is_kxk_conv:
        s.update({k: v for k, v in conv.items() if v is not None})
    if spec.is_norm:
        s = {"algo": "norm"}
    explicit: set[str] = set()
    for o in [*preset.overrides, *overrides]:
        if o.component and not component.startswith(o.component):
            continue
        if o.module_class and o.module_class not in classes:
            continue
        if o.pattern and not presets_mod.match_path_or_ancestor(o.pattern, canon):
            continue
        s.update(o.settings)
        explicit |= set(o.settings)
    if s.get("algo", "lora") != base.get("algo", "lora"):
        # an override that switches algorithm keeps only the options its new algorithm accepts,
        # unless the override itself set them (then they are validated, and wrong ones are errors)
        from .algorithms.base import COMMON_OPTIONS
        alg = algorithms.get(str(s["algo"]))
        allowed = {"algo", "rank", "alpha", "dora_axis", "wd_on_output", *_DORA_KEYS, *_DORA_LAYER_OPTIONS,
                   *COMMON_OPTIONS, *alg.options}
        s = {k: v for k, v in s.items() if k in allowed or k in explicit}
    return s


def _as_overrides(overrides) -> list[presets_mod.Override]:
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        overrides = [{"pattern": k, **v} for k, v in overrides.items()]
    return presets_mod.Preset.from_dict({"overrides": list(overrides)}, name="overrides").overrides


def _split_settings(s: dict) -> tuple[str, dict, bool, str, dict]:
    """(algo, algorithm options, dora on?, dora axis, DoRA layer options) from one layer's settings."""
    from .algorithms.base import coerce_option
    s = dict(s)
    algo = str(s.pop("algo", "lora"))
    dora = False
    for k in _DORA_KEYS:
        if k in s:
            v = s.pop(k)
            dora = dora or (str(v).lower() in ("true", "1", "yes") if isinstance(v, str) else bool(v))
    axis = str(s.pop("dora_axis", "out"))
    if "wd_on_output" in s:
        axis = "out" if str(s.pop("wd_on_output")).lower() not in ("false", "0") else "in"
    if axis not in ("out", "in"):
        raise ConfigError(f"dora_axis must be 'out' or 'in', got {axis!r}")
    dora_opts = {k: coerce_option(k, s.pop(k), d) for k, d in _DORA_LAYER_OPTIONS.items() if k in s}
    return algo, s, dora, axis, dora_opts


# --------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------


class Network(nn.Module):
    """The adapters attached to one model. ``detach()`` restores the model exactly."""

    def __init__(self, components: Mapping[str, nn.Module], family: str | None = None, name: str | None = None):
        super().__init__()
        self.layers = nn.ModuleDict()
        self._targets: dict[str, nn.Module] = {}
        object.__setattr__(self, "_components", dict(components))
        self.family = family
        self.adapter_name = name
        self.attached = False
        self.unmatched: list[str] = []
        self.metadata: dict[str, str] = {}
        self.create_args: dict[str, Any] = {}
        self._frozen: list[nn.Parameter] = []

    # -- construction ------------------------------------------------------------------
    @classmethod
    def create(cls, target, algo: str = "lora", rank: int = 4, alpha: float | None = None, *,
               preset=None, conv_rank: int | None = None, conv_alpha: float | None = None,
               overrides=None, multiplier: float = 1.0, components: Iterable[str] | None = None,
               seed: int | None = None, dtype: torch.dtype | None = None, mode: str = "auto",
               freeze_base: bool = True, **options) -> "Network":
        """See :func:`lyco.create`. ``freeze_base`` sets ``requires_grad=False`` on every base
        parameter of the targeted components (restored by :meth:`detach`)."""
        comps = resolve_target(target)
        if components is not None:
            comps = {k: v for k, v in comps.items() if k in set(components)}
        preset_obj = presets_mod.get(preset if preset is not None else ("full" if "model" in comps else "attn-mlp"))
        ovr = _as_overrides(overrides)
        net = cls(comps, detect_family(comps))
        net.create_args = {"algo": algo, "rank": rank, "alpha": alpha, "preset": preset_obj.name,
                           "conv_rank": conv_rank, "conv_alpha": conv_alpha, **options}
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        base = {"algo": algo, "rank": rank, "alpha": alpha, **options}
        conv = {"rank": conv_rank, "alpha": conv_alpha}
        dora_opts_unused: set[str] = set()  # DoRA layer options set (true) where DoRA is off
        any_dora = False
        for comp, root in comps.items():
            for path, canon, mod, classes, spec in select_layers(comp, root, preset_obj):
                s = _settings_for(comp, canon, classes, spec, base, conv, preset_obj, ovr)
                algo_name, opts, dora, axis, dora_opts = _split_settings(s)
                alg = algorithms.get(algo_name)
                if not alg.supports(spec):
                    raise ConfigError(f"layer {comp}.{canon} ({spec.kind}): algorithm {alg.name!r} does not support "
                                      f"it; exclude it or override its algo (supported: {', '.join(alg.kinds)})")
                opts = alg.validate_options(opts)
                w = mod.weight.detach()
                try:
                    t = alg.create(spec, opts, weight=w.float().cpu(), generator=gen)
                except LycoError as e:
                    raise ConfigError(f"layer {comp}.{canon} {tuple(spec.weight_shape)}: {e}") from None
                if dora:
                    alg_used = dora_wrap(alg)
                    w0 = w.float().cpu()
                    t["dora_scale"] = init_magnitude(w0 + alg.delta_weight(t, spec, w0), axis)
                else:
                    alg_used = alg
                pdt = dtype or _accum_dtype(w.dtype)
                t = {k: v.to(device=w.device, dtype=pdt if v.is_floating_point() else v.dtype) for k, v in t.items()}
                layer_opts = {k: opts[k] for k in ("dropout", "rank_dropout", "rank_dropout_scale",
                                                   "module_dropout", "block_size") if k in opts}
                if dora:
                    layer_opts.update(dora_opts)
                    any_dora = True
                else:
                    dora_opts_unused |= {k for k, v in dora_opts.items() if v}
                net._add(f"{comp}.{canon}", mod, AdapterLayer(f"{comp}.{canon}", alg_used, spec, t, layer_opts,
                                                              multiplier, trainable=True, mode=mode))
        if dora_opts_unused and not any_dora:
            raise ConfigError(f"{', '.join(sorted(dora_opts_unused))} set but no layer uses DoRA; "
                              "add dora=True (or remove the option)")
        if not net.layers:
            raise ConfigError(f"preset {preset_obj.name!r} matched no layer in {sorted(comps)}; "
                              "check target_modules/target_names (class names and full dotted paths)")
        if freeze_base:
            net._freeze()
        net.attach()
        return net

    def _freeze(self) -> None:
        own = {id(p) for p in self.parameters()}
        for root in self._components.values():
            for p in root.parameters():
                if id(p) not in own and p.requires_grad:
                    self._frozen.append(p)
                    p.requires_grad_(False)

    @classmethod
    def from_adapter(cls, adapter: Adapter, target, *, multiplier: float = 1.0, te_multiplier: float | None = None,
                     strict: bool = True, trainable: bool = False, name: str | None = None, mode: str = "auto",
                     family: str | None = None) -> "Network":
        comps = resolve_target(target)
        net = cls(comps, family or adapter.family or detect_family(comps), name)
        net.metadata = dict(adapter.metadata)
        plan, unmatched = _plan_or_raise(adapter, comps, family, strict)
        net.unmatched = unmatched
        for name_, mod, spec, ma in plan:
            m, t = _module_inputs(name_, mod, ma, multiplier, te_multiplier)
            net._add(name_, mod, AdapterLayer(name_, ma.algorithm, spec, t, {}, m, trainable=trainable, mode=mode))
        net.attach()
        if unmatched:
            warnings.warn(f"{adapter.source or 'adapter'}: {len(unmatched)} module(s) did not match the model and "
                          f"were skipped: {', '.join(unmatched[:8])}{' …' if len(unmatched) > 8 else ''}",
                          stacklevel=3)
        return net

    def _add(self, name: str, module: nn.Module, layer: AdapterLayer) -> None:
        key = name.replace(".", "__")
        if key in self.layers:
            raise ConfigError(f"layer {name!r} targeted twice")
        self.layers[key] = layer
        self._targets[key] = module

    # -- attach / detach ---------------------------------------------------------------
    def attach(self) -> "Network":
        if self.attached:
            return self
        done = []
        try:
            for key, layer in self.layers.items():
                LayerHost.of(self._targets[key]).add(layer)
                done.append(key)
        except BaseException:
            for key in done:
                h = LayerHost.of(self._targets[key], create=False)
                if h is not None:
                    h.remove(self.layers[key])
            raise
        self.attached = True
        siblings.link(self._components.values())
        return self

    def detach(self) -> None:
        """Remove every adapter layer (unmerging first); the model is exactly as before."""
        for key, layer in self.layers.items():
            h = LayerHost.of(self._targets[key], create=False)
            if h is not None:
                h.remove(layer)
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []
        self.attached = False
        siblings.link(self._components.values())

    remove = detach

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()

    # -- runtime knobs -----------------------------------------------------------------
    def _layers_of(self, components=None):
        for layer in self.layers.values():
            comp = split_name(layer.name)[0]
            if components is None or comp in components:
                yield layer

    def set_multiplier(self, multiplier: float | None = None, te: float | None = None) -> None:
        """Set the UNet/model multiplier and (optionally) a separate text-encoder multiplier."""
        for layer in self.layers.values():
            comp = split_name(layer.name)[0]
            if comp in TEXT_COMPONENTS and te is not None:
                layer.multiplier = float(te)
            elif multiplier is not None:
                layer.multiplier = float(multiplier)
            if layer.is_merged:
                layer.host.merge(layer, layer.multiplier)

    def enable(self, flag: bool = True) -> None:
        for layer in self.layers.values():
            layer.enabled = flag

    def disable(self) -> None:
        self.enable(False)

    def merge(self) -> None:
        """Bake into the weights (exactly reversible with :meth:`unmerge`)."""
        for layer in self.layers.values():
            if layer.host is not None:
                layer.host.merge(layer, layer.multiplier)

    def unmerge(self) -> None:
        for layer in self.layers.values():
            if layer.host is not None and layer.is_merged:
                layer.host.unmerge(layer)

    # -- training helpers --------------------------------------------------------------
    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, lr: float, unet_lr: float | None = None, te_lr: float | None = None,
                     loraplus_ratio: float | None = None) -> list[dict]:
        """Optimizer groups: per component learning rates, LoRA+ (``up`` factors at lr·ratio)."""
        groups: dict[tuple[str, bool], list] = {}
        for layer in self.layers.values():
            comp = split_name(layer.name)[0]
            for attr, p in layer.params.items():
                if not p.requires_grad:
                    continue
                plus = bool(loraplus_ratio) and attr.startswith(("lora_up", "hada_w1_a", "hada_w2_a", "lokr_w2"))
                groups.setdefault((comp, plus), []).append(p)
        out = []
        for (comp, plus), ps in sorted(groups.items()):
            base = te_lr if comp in TEXT_COMPONENTS and te_lr is not None else (
                unet_lr if comp == "unet" and unet_lr is not None else lr)
            if base == 0:
                continue
            out.append({"params": ps, "lr": base * (loraplus_ratio if plus else 1.0),
                        "name": f"{comp}{'+' if plus else ''}"})
        return out

    # -- export ------------------------------------------------------------------------
    def to_adapter(self, metadata: Mapping[str, str] | None = None) -> Adapter:
        mods = {}
        for layer in self.layers.values():
            name = layer.algorithm.name
            if name == "dylora":
                name = "lora"
            mods[layer.name] = ModuleAdapter(name, layer.exported())
        md = dict(self.metadata)
        if metadata:
            md.update({k: str(v) for k, v in metadata.items()})
        return Adapter(mods, md, self.family, None, dict(self.create_args))

    def save(self, path, dtype: str | torch.dtype | None = None, metadata: Mapping[str, Any] | None = None,
             **kw) -> None:
        self.to_adapter().save(path, dtype=dtype, metadata=metadata, **kw)

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers.values():
            k = repr(layer.algorithm) if getattr(layer.algorithm, "is_dora", False) else layer.algorithm.name
            out[k] = out.get(k, 0) + 1
        return out


# --------------------------------------------------------------------------------------
# Planning an adapter onto a model (validation before anything is touched)
# --------------------------------------------------------------------------------------


def check_family(adapter: Adapter, comps: Mapping[str, nn.Module]) -> None:
    """Raise :class:`FamilyMismatch` when the adapter's family and the model's are both known and
    differ (an SDXL file on an SD1 UNet, SD2 on SD1 by cross-attention width…)."""
    found = adapter.family
    # a lone text encoder tells nothing (SD1's encoder is SDXL's first one): no check then
    known = "unet" in comps or "text_encoder_2" in comps
    expected = detect_family(comps) if found and known else None
    if found and expected and found != expected:
        raise FamilyMismatch(found, expected, file=adapter.source)


def plan_adapter(adapter: Adapter, comps: Mapping[str, nn.Module], *, family: str | None = None,
                 strict: bool = True):
    """[(canonical name, module, spec, ModuleAdapter)] and the unmatched names; raises on misfit.

    Before anything else the adapter's family is compared with the model's (:func:`check_family`),
    so a file for another family fails with one clear :class:`FamilyMismatch` instead of a shape
    error on whichever layer comes first. ``family=`` (the family to assume, as given by the
    caller) or ``strict=False`` skips that check."""
    if family is None and strict:
        check_family(adapter, comps)
    tables: dict[str, naming.NameTable] = {}
    plan, unmatched = [], []
    acomps = adapter.components()
    for name, ma in adapter.modules.items():
        comp, path = split_name(name)
        target_comp = _component_for(comp, comps, acomps)
        if target_comp is None:
            unmatched.append(name)
            continue
        if target_comp not in tables:
            tables[target_comp] = naming.NameTable(target_comp, comps[target_comp])
        table = tables[target_comp]
        real = table.resolve(path)
        mod = comps[target_comp].get_submodule(real) if real is not None else None
        if mod is None or layer_kind(mod) is None:
            unmatched.append(name)
            continue
        spec = LayerSpec.from_module(mod)
        alg = ma.algorithm
        check_fits(name, alg, ma.tensors, mod, spec, file=adapter.source)
        canon = f"{target_comp}.{table.canonical(real)}"
        plan.append((canon, mod, spec, ma))
    return plan, unmatched


def _plan_or_raise(adapter: Adapter, comps, family: str | None, strict: bool):
    """:func:`plan_adapter`, refusing unmatched modules when ``strict``."""
    plan, unmatched = plan_adapter(adapter, comps, family=family, strict=strict)
    if unmatched and strict:
        raise UnknownKeys(unmatched, file=adapter.source, what="adapter modules (no such layer in the model)",
                          hint="pass strict=False / --allow-unmatched to skip them")
    return plan, unmatched


def _module_inputs(name: str, module: nn.Module, ma: ModuleAdapter, multiplier: float,
                   te_multiplier: float | None) -> tuple[float, dict[str, torch.Tensor]]:
    """The multiplier of one planned module (``te_multiplier`` for text encoders when given) and its
    tensors on the layer's device, floating ones in the accumulation dtype (fp32; fp64 stays)."""
    m = te_multiplier if (te_multiplier is not None and split_name(name)[0] in TEXT_COMPONENTS) else multiplier
    w = module.weight
    acc = _accum_dtype(w.dtype)
    return m, {k: (v.to(w.device, acc) if v.is_floating_point() else v.to(w.device)) for k, v in ma.tensors.items()}


@torch.no_grad()
def merge_adapter_into(adapter: Adapter, target, multiplier: float = 1.0, te_multiplier: float | None = None,
                       strict: bool = True, family: str | None = None) -> list[str]:
    """Bake an adapter into the weights: ΔW in fp32, one cast. All-or-nothing."""
    comps = resolve_target(target)
    plan, unmatched = _plan_or_raise(adapter, comps, family, strict)
    backups = []
    try:
        for name, mod, spec, ma in plan:
            m, t = _module_inputs(name, mod, ma, multiplier, te_multiplier)
            w, b = mod.weight, mod.bias
            acc = _accum_dtype(w.dtype)
            w2, b2 = ma.algorithm.merged(t, spec, w.to(acc), b.to(acc) if b is not None else None, m)
            backups.append((mod, w.detach().clone(), b.detach().clone() if b is not None else None))
            w.copy_(w2.to(w.dtype))
            if b is not None and b2 is not None:
                b.copy_(b2.to(b.dtype))
    except BaseException:
        for mod, w0, b0 in reversed(backups):  # newest first: a layer merged twice ends at its original
            mod.weight.copy_(w0)
            if b0 is not None:
                mod.bias.copy_(b0)
        raise
    return unmatched

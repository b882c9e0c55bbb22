"""Adapters in diffusers pipelines, used the way people use them in A1111 and ComfyUI.

    import lyco.pipeline as lp
    lp.load(pipe, "style.safetensors", multiplier=0.8)                 # UNet and TE at 0.8
    lp.load(pipe, "char.safetensors", multiplier=1.0, te_multiplier=0.5, name="char")
    lp.set_weights(pipe, "style", unet=0.5, te=0.3)
    lp.disable(pipe, "char"); lp.enable(pipe, "char")
    lp.fuse(pipe); images = pipe(...).images; lp.unfuse(pipe)        # unfuse is bit-exact
    lp.remove(pipe, "style")
    r = lp.apply_prompt(pipe, "a cat <lora:style:0.8> <lyco:char:1:0.6>", ["loras/"])
    images = pipe(r.prompt, ...).images                                # tags removed
    out = lp.generate(pipe, "a cat <lora:style:0.8>", adapter_dirs=["loras/"], seed=1)
    out.image, out.infotext                                            # A1111-style parameters

Every adapter lyco reads attaches (every algorithm, kohya/LyCORIS files with diffusers or LDM
UNet names, diffusers/PEFT LoRA files) to an SD1/SD2/SDXL pipeline, several at once, each with
its own UNet and text-encoder multipliers. The state lives in a small registry attached to the
pipeline (:func:`adapters`); nothing ever reloads the pipeline. Attached adapters run on the fly
("bypass": the layer's output plus each adapter's structured delta); :meth:`PipelineAdapters.fuse`
bakes the enabled ones into the weights for speed and :meth:`~PipelineAdapters.unfuse` restores
the original weights bit for bit (snapshot-based, see :mod:`lyco.layer`), however often it runs.
While fused, changing a weight, enabling, disabling, loading or removing an adapter keeps the
fused weights right (each change is recomputed from the snapshot, not added on top).

Adapter tensors live on the device of the layer they patch, in fp32 (the layer's forward casts the
delta to the activation dtype); when the pipeline moves (``pipe.to("cuda")``) they follow before the
moved UNet/text encoder next runs (a forward pre-hook), or at once with
:meth:`PipelineAdapters.sync_devices`. Offloading that moves weights inside ``forward`` (accelerate's
CPU-offload hooks) is not followed.
"""

from __future__ import annotations

import json
import os
import secrets
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from . import prompt as prompt_mod
from .adapter import Adapter, ModuleAdapter
from .errors import ConfigError, FamilyMismatch, LycoError, ShapeMismatch, UnknownKeys

_REGISTRY_ATTR = "_lyco_adapters"
_UNSET: Any = object()

__all__ = ["PipelineAdapters", "Entry", "PromptResult", "Generation", "GridResult", "adapters", "load",
           "set_weights", "enable", "disable", "remove", "list_adapters", "fuse", "unfuse", "apply_prompt",
           "truncate_adapter", "generate", "grid", "infotext", "parse_infotext", "save_png", "load_base"]


# --------------------------------------------------------------------------------------
# dyn: LoRA rank truncation
# --------------------------------------------------------------------------------------


def truncate_adapter(adapter: Adapter, dyn: int | None) -> Adapter:
    """The adapter with every LoRA/LoCon module cut to its first ``dyn`` ranks (A1111's ``dyn``;
    alpha kept, so the scale becomes alpha/dyn). Other algorithms are left as they are."""
    if dyn is None:
        return adapter
    from .algorithms.lora import truncate
    mods = {}
    for n, m in adapter.modules.items():
        if m.algo in ("lora", "dylora") and "lora_down.weight" in m.tensors:
            r = int(m.tensors["lora_down.weight"].shape[0])
            mods[n] = ModuleAdapter(m.algo, truncate(m.tensors, min(int(dyn), r))) if dyn < r else m
        else:
            mods[n] = m
    out = Adapter(mods, dict(adapter.metadata), adapter.family, adapter.source, dict(adapter.create_args))
    if hasattr(adapter, "extras"):
        out.extras = adapter.extras  # type: ignore[attr-defined]
    return out


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One adapter attached to a pipeline."""

    name: str
    adapter: Adapter
    network: Any                      # lyco.network.Network
    unet: float
    te: float
    enabled: bool = True
    dyn: int | None = None
    path: Path | None = None
    alias: str | None = None          # the name A1111 shows (ss_output_name, else the file stem)
    origin: str = "user"              # "user" (load) or "prompt" (apply_prompt)
    strict: bool = True               # unmatched modules were an error (False: skipped with a warning)

    @property
    def short_hash(self) -> str | None:
        """A1111's 12-digit short hash (``sshs_model_hash`` or the hash of the file's tensor data)."""
        if self.path is not None and self.path.exists():
            return prompt_mod.short_hash(self.path)
        h = self.adapter.metadata.get("sshs_model_hash", "")
        return h[:12].lower() if len(h) >= 12 else None

    def info(self, fused: bool = False) -> dict[str, Any]:
        return {"name": self.name, "alias": self.alias, "path": str(self.path) if self.path else None,
                "unet": self.unet, "te": self.te, "dyn": self.dyn, "enabled": self.enabled,
                "fused": bool(fused and self.enabled), "origin": self.origin,
                "modules": len(self.network.layers), "algos": self.adapter.algos(),
                "family": self.adapter.family}


@dataclass
class PromptResult:
    prompt: str                       # the prompt without adapter tags
    tags: list                        # the parsed AdapterTag objects
    names: list[str]                  # registry names the tags activated, in tag order


def _read(source) -> tuple[Adapter, Path | None]:
    if isinstance(source, Adapter):
        return source, Path(source.source) if source.source and os.path.isfile(source.source) else None
    if isinstance(source, (str, os.PathLike)):
        from . import load as lyco_load
        return lyco_load(source), Path(source)
    raise ConfigError(f"expected an adapter file path or a lyco.Adapter, got {type(source).__name__}")


class PipelineAdapters:
    """The adapters attached to one diffusers pipeline (get it with :func:`adapters`)."""

    def __init__(self, pipe):
        self._pipe_ref = weakref.ref(pipe)
        self.entries: dict[str, Entry] = {}
        self.fused = False
        self._indexes: dict[tuple[str, ...], prompt_mod.AdapterIndex] = {}
        self._hooks: list = []                      # forward pre-hooks that keep devices in step
        self._seen: dict[str, torch.device] = {}    # component → device its adapters were synced to

    @property
    def pipe(self):
        p = self._pipe_ref()
        if p is None:
            raise LycoError("the pipeline these adapters belonged to no longer exists")
        return p

    # -- container -----------------------------------------------------------------------
    def __contains__(self, name) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            have = ", ".join(repr(n) for n in self.entries) or "none"
            raise LycoError(f"no adapter named {name!r} is loaded in this pipeline (loaded: {have})") from None

    def list(self) -> list[dict[str, Any]]:
        """One dict per adapter: name, alias, path, unet/te weights, dyn, enabled, fused, modules…"""
        return [e.info(self.fused) for e in self.entries.values()]

    def active(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.enabled]

    # -- attaching -------------------------------------------------------------------------
    def _attach(self, adapter: Adapter, dyn: int | None, unet: float, te: float, strict: bool, name: str):
        from .network import detect_family, resolve_target
        a = truncate_adapter(adapter, dyn)
        try:
            return a.attach(self.pipe, multiplier=unet, te_multiplier=te, strict=strict, name=name)
        except (UnknownKeys, ShapeMismatch) as e:
            fam_a = adapter.family
            fam_p = detect_family(resolve_target(self.pipe))
            if fam_a and fam_p and fam_a != fam_p:
                raise FamilyMismatch(fam_a, fam_p, file=adapter.source) from e
            raise

    def load(self, source, multiplier: float = 1.0, te_multiplier: float | None = None,
             name: str | None = None, *, dyn: int | None = None, strict: bool = True,
             enabled: bool = True, origin: str = "user") -> Entry:
        """Attach an adapter (a file path or a :class:`lyco.Adapter`) under ``name`` (default: the
        file stem). ``multiplier`` weights the UNet, ``te_multiplier`` the text encoder(s)
        (default: the same as ``multiplier``); ``dyn`` keeps the first ``dyn`` LoRA ranks."""
        adapter, path = _read(source)
        if name is None:
            name = path.stem if path is not None else (Path(adapter.source).stem if adapter.source else None)
            name = name or f"adapter{len(self.entries) + 1}"
        if name in self.entries:
            raise ConfigError(f"an adapter named {name!r} is already loaded; use set_weights() to change "
                              f"its weights, remove() it first, or pass another name=")
        if dyn is not None and int(dyn) < 1:
            raise ConfigError(f"dyn must be at least 1, got {dyn}")
        unet = float(multiplier)
        te = unet if te_multiplier is None else float(te_multiplier)
        net = self._attach(adapter, dyn, unet, te, strict, name)
        alias = (str(adapter.metadata.get("ss_output_name", "")).strip()
                 or (path.stem if path is not None else None) or name)
        _warm(net)
        e = Entry(name, adapter, net, unet, te, bool(enabled), int(dyn) if dyn else None, path, alias, origin,
                  bool(strict))
        self.entries[name] = e
        self._watch_devices()
        if not enabled:
            net.disable()
        elif self.fused:
            net.merge()
        return e

    def set_weights(self, name: str, unet: float | None = None, te: float | None = None, *,
                    dyn: int | None = _UNSET) -> Entry:
        """Change an adapter's UNet and/or text-encoder multiplier (and its ``dyn`` rank cut: ``None``
        restores the full rank) without reloading anything."""
        e = self[name]
        new_unet = e.unet if unet is None else float(unet)
        new_te = e.te if te is None else float(te)
        if dyn is not _UNSET and (dyn or None) != e.dyn:
            if dyn is not None and int(dyn) < 1:
                raise ConfigError(f"dyn must be at least 1, got {dyn}")
            new = self._attach(e.adapter, dyn, new_unet, new_te, e.strict, e.name)
            _warm(new)
            e.network.detach()  # unmerges first: the weights go back to the snapshot
            e.network, e.dyn = new, (int(dyn) if dyn else None)
            if not e.enabled:
                new.disable()
            elif self.fused:
                new.merge()
        elif new_unet != e.unet or new_te != e.te:
            e.network.set_multiplier(new_unet, te=new_te)  # re-merges from the snapshot when fused
        e.unet, e.te = new_unet, new_te
        return e

    def enable(self, name: str) -> None:
        e = self[name]
        if e.enabled:
            return
        e.enabled = True
        e.network.enable(True)
        if self.fused:
            e.network.merge()

    def disable(self, name: str) -> None:
        e = self[name]
        if not e.enabled:
            return
        e.enabled = False
        if self.fused:
            e.network.unmerge()
        e.network.disable()

    def remove(self, name: str) -> None:
        """Detach the adapter; the layers it touched are exactly as before it came."""
        e = self[name]
        e.network.detach()
        del self.entries[name]
        if not self.entries:
            self._unwatch_devices()

    def clear(self) -> None:
        for name in [*self.entries]:
            self.remove(name)
        self.fused = False
        self._unwatch_devices()

    # -- fusing ----------------------------------------------------------------------------
    def fuse(self) -> None:
        """Bake every enabled adapter into the weights (fp32 math from a snapshot, one cast)."""
        self.sync_devices()
        for e in self.entries.values():
            if e.enabled:
                e.network.merge()
        self.fused = True

    def unfuse(self) -> None:
        """Back to the on-the-fly forward; the base weights are restored bit for bit."""
        for e in self.entries.values():
            e.network.unmerge()
        self.fused = False

    # -- devices ---------------------------------------------------------------------------
    def sync_devices(self, component: str | None = None) -> None:
        """Move adapter tensors to the device of the layer each patches (after ``pipe.to(...)``;
        also done automatically before a moved UNet/text encoder runs)."""
        prefix = None if component is None else component + "."
        for e in self.entries.values():
            for layer in e.network.layers.values():
                host = layer.host
                if host is None or (prefix is not None and not layer.name.startswith(prefix)):
                    continue
                dev = host.module.weight.device
                t = next(iter(layer.tensors().values()), None)
                if t is not None and t.device != dev:
                    layer.to(dev)
                    _warm_layer(layer)

    def _watch_devices(self) -> None:
        """A forward pre-hook on the UNet and each text encoder: when the component has moved since
        its adapters were last synced (``pipe.to("cuda")``, ``pipe.unet.to(...)``), the adapter
        tensors follow before it runs. (Offloading that moves weights inside ``forward``, as
        accelerate's CPU-offload hooks do, is not followed: attach after placing the model.)"""
        self._seen.clear()  # new layers: check once on the next call
        if self._hooks:
            return
        pipe = self.pipe
        ref = weakref.ref(self)
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            m = getattr(pipe, comp, None)
            if isinstance(m, torch.nn.Module):
                self._hooks.append(m.register_forward_pre_hook(_device_hook(ref, comp)))

    def _unwatch_devices(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._seen.clear()

    # -- prompts ---------------------------------------------------------------------------
    def index(self, adapter_dirs: Iterable[str | os.PathLike]) -> prompt_mod.AdapterIndex:
        key = tuple(os.path.abspath(str(d)) for d in adapter_dirs)
        idx = self._indexes.get(key)
        if idx is None:
            idx = self._indexes[key] = prompt_mod.AdapterIndex(key)
        return idx

    def _entry_for_path(self, path: Path) -> Entry | None:
        real = os.path.realpath(path)
        for e in self.entries.values():
            if e.path is not None and os.path.realpath(e.path) == real:
                return e
        return None

    def _free_name(self, name: str) -> str:
        if name not in self.entries:
            return name
        i = 2
        while f"{name}#{i}" in self.entries:
            i += 1
        return f"{name}#{i}"

    def apply_prompt(self, prompt: str, adapter_dirs: Iterable[str | os.PathLike] = (), *,
                     strict: bool = True) -> PromptResult:
        """Activate the adapters a prompt's ``<lora:…>``/``<lyco:…>`` tags name, at their weights,
        and return the prompt without the tags.

        Files are found in ``adapter_dirs`` by stem or alias and stay loaded (disabled) when a later
        prompt no longer names them, so switching back costs nothing. Adapters loaded with
        :meth:`load` are left as they are unless a tag names their file.
        """
        clean, tags = prompt_mod.parse(prompt)
        wanted: dict[str, prompt_mod.AdapterTag] = {}
        if tags:
            idx = self.index(adapter_dirs)
            found = [(tag, idx.resolve(tag.name)) for tag in tags]  # every name first: fail before loading
            for tag, f in found:
                e = self._entry_for_path(f.path)
                if e is None:
                    e = self.load(f.path, tag.unet, tag.te, name=self._free_name(f.display_name), dyn=tag.dyn,
                                  strict=strict, origin="prompt", enabled=False)
                if e.name in wanted:
                    warnings.warn(f"adapter {tag.name!r} is named by more than one tag; the last one "
                                  f"({tag.text}) wins", stacklevel=2)
                    del wanted[e.name]
                wanted[e.name] = tag
        for name, e in self.entries.items():
            tag = wanted.get(name)
            if tag is not None:
                self.set_weights(name, unet=tag.unet, te=tag.te, dyn=tag.dyn)
                self.enable(name)
            elif e.origin == "prompt":
                self.disable(name)
        return PromptResult(clean, tags, [*wanted])

    def hashes(self) -> dict[str, str]:
        """``{alias: short hash}`` of the enabled adapters (A1111's ``Lora hashes``)."""
        out = {}
        for e in self.active():
            h = e.short_hash
            if h:
                out[prompt_mod.infotext_name(e.alias or e.name)] = h
        return out


def _warm_layer(layer) -> None:
    hot = getattr(layer, "_hot_tensors", None)
    if hot is not None:
        hot()


def _warm(net) -> None:
    """Read each layer's scalar tensors (alpha…) into Python numbers now, outside any
    ``torch.compile`` trace: a layer that did it lazily inside the first compiled forward would
    break the graph there (``float(tensor)`` is data-dependent for dynamo)."""
    for layer in net.layers.values():
        _warm_layer(layer)


def _device_hook(ref, component: str):
    def hook(module, args):
        reg = ref()
        if reg is None:
            return None
        p = next(module.parameters(), None)
        dev = p.device if p is not None else None
        if reg._seen.get(component) != dev:
            reg.sync_devices(component)
            reg._seen[component] = dev
        return None
    return hook


def adapters(pipe) -> PipelineAdapters:
    """The adapter registry of ``pipe`` (created on first use, stored on the pipeline object)."""
    reg = pipe.__dict__.get(_REGISTRY_ATTR)
    if reg is None:
        if not any(isinstance(getattr(pipe, c, None), torch.nn.Module) for c in ("unet", "text_encoder")):
            raise ConfigError(f"{type(pipe).__name__} is not a Stable Diffusion pipeline (no unet/text_encoder)")
        reg = PipelineAdapters(pipe)
        object.__setattr__(pipe, _REGISTRY_ATTR, reg)
    return reg


def load(pipe, source, multiplier: float = 1.0, te_multiplier: float | None = None, name: str | None = None,
         **kw) -> Entry:
    """Attach an adapter file (or :class:`lyco.Adapter`) to ``pipe``; see :meth:`PipelineAdapters.load`."""
    return adapters(pipe).load(source, multiplier, te_multiplier, name, **kw)


def set_weights(pipe, name: str, unet: float | None = None, te: float | None = None, **kw) -> Entry:
    return adapters(pipe).set_weights(name, unet, te, **kw)


def enable(pipe, name: str) -> None:
    adapters(pipe).enable(name)


def disable(pipe, name: str) -> None:
    adapters(pipe).disable(name)


def remove(pipe, name: str) -> None:
    adapters(pipe).remove(name)


def list_adapters(pipe) -> list[dict[str, Any]]:
    return adapters(pipe).list()


def fuse(pipe) -> None:
    adapters(pipe).fuse()


def unfuse(pipe) -> None:
    adapters(pipe).unfuse()


def apply_prompt(pipe, prompt: str, adapter_dirs: Iterable[str | os.PathLike] = (), **kw) -> PromptResult:
    return adapters(pipe).apply_prompt(prompt, adapter_dirs, **kw)


# --------------------------------------------------------------------------------------
# Infotext (A1111's "parameters" PNG chunk)
# --------------------------------------------------------------------------------------

_SAMPLER_NAMES = {
    "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a",
    "PNDMScheduler": "PLMS", "DDIMScheduler": "DDIM", "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun", "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE", "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a", "UniPCMultistepScheduler": "UniPC",
    "DDPMScheduler": "DDPM", "LCMScheduler": "LCM",
}


def sampler_name(pipe) -> str:
    n = type(pipe.scheduler).__name__
    return _SAMPLER_NAMES.get(n, n)


def _quote(v: Any) -> str:
    s = str(v)
    if any(c in s for c in ",:\n\""):
        return json.dumps(s, ensure_ascii=False)
    return s


def infotext(prompt: str, negative: str = "", params: Mapping[str, Any] | None = None) -> str:
    """A1111's generation-parameters text: the prompt, ``Negative prompt: …``, then one line of
    ``Key: value`` pairs (values with ``,``/``:`` JSON-quoted, e.g. ``Lora hashes: "a: 0123456789ab"``)."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    pairs = [f"{k}: {_quote(v)}" for k, v in (params or {}).items() if v is not None and v != ""]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """``(prompt, negative, params)`` of an infotext written by :func:`infotext` (or A1111)."""
    lines = text.split("\n")
    last = lines[-1] if lines else ""
    params: dict[str, str] = {}
    i = 0
    while i < len(last):
        j = last.find(": ", i)
        if j < 0:
            break
        key = last[i:j].strip()
        i = j + 2
        if i < len(last) and last[i] == '"':
            try:
                val, end = json.JSONDecoder().raw_decode(last, i)
            except ValueError as e:  # infotext is data from a PNG: malformed text is an error, not a crash
                from .errors import LycoError
                raise LycoError(f"infotext: malformed quoted value for {key[:40]!r} at column {i}: "
                                f"{getattr(e, 'msg', e)}") from None
            i = end
        else:
            end = last.find(", ", i)
            end = len(last) if end < 0 else end
            val, i = last[i:end], end
        params[key] = str(val)
        if last.startswith(", ", i):
            i += 2
    body = lines[:-1]
    neg_at = next((k for k, line in enumerate(body) if line.startswith("Negative prompt: ")), None)
    if neg_at is None:
        return "\n".join(body), "", params
    negative = "\n".join([body[neg_at][len("Negative prompt: "):], *body[neg_at + 1:]])
    return "\n".join(body[:neg_at]), negative, params


def save_png(image, path, text: str | None = None, *, overwrite: bool = False) -> None:
    """Write ``image`` as PNG atomically, with ``text`` in its ``parameters`` chunk."""
    from PIL.PngImagePlugin import PngInfo

    from .formats.safetensors_io import atomic_write
    info = PngInfo()
    if text:
        info.add_text("parameters", text)
    with atomic_write(path, overwrite=overwrite) as f:
        image.save(f, format="PNG", pnginfo=info)


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------


@dataclass
class Generation:
    image: Any                        # PIL.Image
    infotext: str
    seed: int
    prompt: str                       # what the text encoder saw (tags removed)


def default_size(pipe) -> tuple[int, int]:
    s = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    return s, s


def _new_seed(seed: int | None) -> int:
    return secrets.randbelow(2**32) if seed is None or int(seed) < 0 else int(seed)


class _Progress:
    """A tqdm bar over denoising steps, fed by the pipeline's step callback."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def callback(self, pipe, step, timestep, kwargs):
        if self.bar is not None:
            self.bar.update(1)
        return kwargs

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _denoise_calls(pipe, steps: int) -> int:
    """How many times the pipeline's step callback runs for ``steps`` (PLMS adds warm-up steps)."""
    try:
        pipe.scheduler.set_timesteps(int(steps))
        return max(1, len(pipe.scheduler.timesteps))
    except Exception:  # noqa: BLE001 — a scheduler that needs more arguments: count the steps asked
        return int(steps)


def _run(pipe, prompt: str, negative: str, seed: int, steps: int, width: int, height: int, guidance: float,
         progress: _Progress, output_type: str = "pil"):
    gen = torch.Generator("cpu").manual_seed(int(seed))
    saved = getattr(pipe, "_progress_bar_config", None)
    pipe.set_progress_bar_config(disable=True)
    try:
        with torch.inference_mode():
            out = pipe(prompt=prompt, negative_prompt=negative or None, num_inference_steps=int(steps),
                       guidance_scale=float(guidance), width=int(width), height=int(height), generator=gen,
                       output_type=output_type, callback_on_step_end=progress.callback)
    finally:
        if saved is None:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = saved
    return out.images[0]


def _strip_negative(negative: str) -> str:
    if not negative:
        return ""
    clean, tags = prompt_mod.parse(negative)
    if tags:
        warnings.warn("adapter tags in the negative prompt are ignored (removed): "
                      + " ".join(t.text for t in tags), stacklevel=3)
    return clean


def generate(pipe, prompt: str, *, negative: str = "", adapter_dirs: Iterable[str | os.PathLike] = (),
             seed: int | None = None, steps: int = 20, size: tuple[int, int] | None = None,
             guidance: float = 7.0, fuse: bool = False, progress: bool = True, strict: bool = True,
             model_name: str | None = None, model_hash: str | None = None,
             extra_params: Mapping[str, Any] | None = None) -> Generation:
    """One image from a prompt with A1111 adapter tags; returns it with its infotext.

    ``seed`` None or negative draws one (recorded). ``fuse`` bakes the adapters in for the run
    and restores the weights afterwards. The infotext records the prompt as written (tags
    included), the adapters' short hashes and the base model."""
    reg = adapters(pipe)
    applied = reg.apply_prompt(prompt, adapter_dirs, strict=strict)
    neg = _strip_negative(negative)
    seed = _new_seed(seed)
    width, height = size or default_size(pipe)
    reg.sync_devices()
    was_fused = reg.fused
    if fuse and not was_fused:
        reg.fuse()
    bar = _Progress(_denoise_calls(pipe, steps), progress, "generate")
    try:
        image = _run(pipe, applied.prompt, neg, seed, steps, width, height, guidance, bar)
    finally:
        bar.close()
        if fuse and not was_fused:
            reg.unfuse()
    params = _params(pipe, steps, guidance, seed, width, height, model_name, model_hash, reg.hashes(),
                     extra_params)
    return Generation(image, infotext(prompt, negative, params), seed, applied.prompt)


def _params(pipe, steps, guidance, seed, width, height, model_name, model_hash, hashes, extra):
    from . import __version__
    p: dict[str, Any] = {"Steps": int(steps), "Sampler": sampler_name(pipe), "CFG scale": f"{float(guidance):g}",
                         "Seed": int(seed), "Size": f"{int(width)}x{int(height)}", "Model hash": model_hash,
                         "Model": model_name}
    if hashes:
        p["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in hashes.items())
    p.update(extra or {})
    p["Version"] = f"lyco {__version__}"
    return p


# --------------------------------------------------------------------------------------
# Weight grids
# --------------------------------------------------------------------------------------


@dataclass
class GridResult:
    image: Any                        # PIL.Image: the labelled grid
    infotext: str
    cells: list = field(default_factory=list)  # rows of PIL images, unlabelled
    row_labels: list = field(default_factory=list)
    col_labels: list = field(default_factory=list)


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _short(text: str, n: int = 48) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def compose_grid(cells: Sequence[Sequence[Any]], row_labels: Sequence[str], col_labels: Sequence[str],
                 title: str | None = None):
    """Cells (rows of equally sized PIL images) with column labels on top and row labels on the left."""
    from PIL import Image, ImageDraw
    w, h = cells[0][0].size
    fs = max(12, min(32, w // 14))
    font = _font(fs)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def box(text):
        x0, y0, x1, y1 = probe.multiline_textbbox((0, 0), text, font=font, spacing=2)
        return x1 - x0, y1 - y0

    pad = max(4, fs // 2)
    label_w = max([box(t)[0] for t in row_labels] + [0]) + 2 * pad
    head_h = max([box(t)[1] for t in col_labels] + [0]) + 2 * pad
    col_w = max(w, max([box(t)[0] for t in col_labels] + [0]) + 2 * pad)
    title_h = (box(title)[1] + 2 * pad) if title else 0
    row_h = max(h, max([box(t)[1] for t in row_labels] + [0]) + 2 * pad)
    W = label_w + col_w * len(col_labels)
    H = title_h + head_h + row_h * len(row_labels)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.multiline_text((pad, pad), title, fill="black", font=font, spacing=2)
    for j, t in enumerate(col_labels):
        tw, th = box(t)
        draw.multiline_text((label_w + j * col_w + (col_w - tw) // 2, title_h + pad), t, fill="black",
                            font=font, spacing=2, align="center")
    for i, t in enumerate(row_labels):
        tw, th = box(t)
        draw.multiline_text((pad, title_h + head_h + i * row_h + (row_h - th) // 2), t, fill="black",
                            font=font, spacing=2)
        for j, img in enumerate(cells[i]):
            canvas.paste(img.convert("RGB"), (label_w + j * col_w + (col_w - w) // 2,
                                              title_h + head_h + i * row_h + (row_h - h) // 2))
    return canvas


def _weights(values) -> list[float]:
    if isinstance(values, str):
        values = [v for v in values.replace(" ", "").split(",") if v]
    try:
        out = [float(v) for v in values]
    except ValueError:
        raise ConfigError(f"weights must be numbers separated by commas, got {values!r}") from None
    if not out:
        raise ConfigError("no weights given")
    return out


def grid(pipe, adapter, weights, prompts: Sequence[str], seeds: Sequence[int], *, adapter2=None, weights2=None,
         negative: str = "", steps: int = 20, size: tuple[int, int] | None = None, guidance: float = 7.0,
         adapter_dirs: Iterable[str | os.PathLike] = (), progress: bool = True, strict: bool = True,
         model_name: str | None = None, model_hash: str | None = None) -> GridResult:
    """A labelled image: one column per weight of ``adapter`` (UNet and TE alike), one row per
    (prompt, seed[, weight of ``adapter2``]). Every cell of a row uses the same seed; the base
    pipeline is never reloaded — the adapters are attached once, re-weighted per cell and detached
    at the end (the pipeline's weights are then exactly as before)."""
    ws = _weights(weights)
    ws2 = _weights(weights2) if adapter2 is not None else [None]
    if adapter2 is None and weights2 is not None:
        raise ConfigError("weights2 given without adapter2")
    if not prompts:
        raise ConfigError("no prompts given")
    seeds = [_new_seed(s) for s in (seeds or [None])]
    reg = adapters(pipe)
    dirs = tuple(adapter_dirs)
    neg = _strip_negative(negative)
    width, height = size or default_size(pipe)
    added = []
    try:
        e1 = reg.load(adapter, ws[0], name=reg._free_name(_name_of(adapter)), strict=strict)
        added.append(e1.name)
        e2 = None
        if adapter2 is not None:
            e2 = reg.load(adapter2, ws2[0], name=reg._free_name(_name_of(adapter2)), strict=strict)
            added.append(e2.name)
        rows = [(p, s, w2) for p in prompts for s in seeds for w2 in ws2]
        cells = [[None] * len(ws) for _ in rows]
        bar = _Progress(len(rows) * len(ws) * _denoise_calls(pipe, steps), progress, "grid")
        try:
            for j, w in enumerate(ws):
                reg.set_weights(e1.name, unet=w, te=w)
                for i, (p, s, w2) in enumerate(rows):
                    if e2 is not None:
                        reg.set_weights(e2.name, unet=w2, te=w2)
                    clean = reg.apply_prompt(p, dirs, strict=strict).prompt
                    cells[i][j] = _run(pipe, clean, neg, s, steps, width, height, guidance, bar)
        finally:
            bar.close()
        hashes = reg.hashes()
    finally:
        for n in added:
            reg.remove(n)
    col_labels = [f"{e1.alias}: {w:g}" for w in ws]
    row_labels = []
    for p, s, w2 in rows:
        parts = [_short(p) if len(prompts) > 1 else None, f"seed {s}" if len(seeds) > 1 else None,
                 f"{e2.alias}: {w2:g}" if e2 is not None else None]
        row_labels.append("\n".join(x for x in parts if x) or f"seed {s}")
    title = None if len(prompts) > 1 else _short(prompts[0], 120)
    image = compose_grid(cells, row_labels, col_labels, title)
    extra = {"Grid": f"{e1.alias} x {','.join(f'{w:g}' for w in ws)}"
             + (f"; {e2.alias} y {','.join(f'{w:g}' for w in ws2)}" if e2 is not None else ""),
             "Seeds": ",".join(str(s) for s in seeds)}
    params = _params(pipe, steps, guidance, seeds[0], width, height, model_name, model_hash, hashes, extra)
    return GridResult(image, infotext(prompts[0], negative, params), cells, row_labels, col_labels)


def _name_of(source) -> str:
    if isinstance(source, Adapter):
        return Path(source.source).stem if source.source else "adapter"
    return Path(str(source)).stem


# --------------------------------------------------------------------------------------
# Base models for the CLI
# --------------------------------------------------------------------------------------


def load_base(model: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
              tokenizer: str | None = None, tokenizer_2: str | None = None):
    """``(pipe, model name, model hash)`` for a diffusers folder, a single-file checkpoint or a
    built-in tiny model (``tiny:sd1``, ``tiny:sd2``, ``tiny:sdxl``), moved to ``device``."""
    if model.startswith("tiny:"):
        from .models import tiny
        kind = model.split(":", 1)[1] or "sd1"
        if kind not in ("sd1", "sd2", "sdxl"):
            raise ConfigError(f"unknown built-in model {model!r}; use tiny:sd1, tiny:sd2 or tiny:sdxl")
        pipe = tiny.tiny_pipeline(kind, seed=0, dtype=dtype or torch.float32)
        name, mhash = model, None
    else:
        p = Path(model)
        if not p.exists():
            raise LycoError(f"{model}: no such model (a diffusers folder, a single-file checkpoint or tiny:sd1)")
        from .formats.checkpoint import load_pipeline
        toks = {}
        for key, folder in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)):
            if folder:
                from transformers import CLIPTokenizer
                try:
                    toks[key] = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
                except Exception as e:  # noqa: BLE001 — transformers raises many kinds
                    raise LycoError(f"{folder}: cannot read a CLIP tokenizer ({e})") from None
        pipe = load_pipeline(p, dtype=dtype, **toks)
        name = p.stem if p.is_file() else p.name
        mhash = None
        if p.is_file():
            from .formats.metadata import sd_model_hashes
            mhash = sd_model_hashes(p)[1][:10]
    pipe = pipe.to(device)
    return pipe, name, mhash

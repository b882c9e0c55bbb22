"""File metadata: kohya ``ss_*`` keys, SAI ModelSpec ``modelspec.*`` keys, the ``sshs_*`` hashes,
base-model hashes, safe printing, and lyco's own ``lyco_*`` keys.

Every value in a safetensors header is a string; the builders here return ``dict[str, str]``.

lyco's own keys (``lyco_*``)
----------------------------
Where the ecosystem disagrees about what a tensor means, the writer records the convention it
used, so a later reader (ours, or a person with ``lyco inspect``) need not guess:

``lyco_version``
    Version of lyco that wrote the file (e.g. ``0.1.0``).
``lyco_dora_axis``
    ``output`` or ``input``: the axis ``dora_scale`` is normalised along. ``output`` = a norm per
    output row, ``dora_scale`` shape ``(out, 1, …)`` (LyCORIS ``wd_on_output=True``, its default
    since 3.2.0, and PEFT's ``lora_magnitude_vector``); ``input`` = a norm per input channel, shape
    ``(1, in, 1, …)`` (pre-3.2 LyCORIS, what A1111/InvokeAI assume). The shape usually tells, but
    not for 1-wide layers.
``lyco_oft_constraint``
    ``lycoris`` or ``comfyui``: how OFT/BOFT ``alpha`` (the COFT constraint) bounds ``‖Q‖_F``.
    ``lycoris``: κ = alpha · out_dim (LyCORIS); ``comfyui``: κ = alpha (ComfyUI's reading).
``lyco_lokr_full_scale``
    ``one`` or ``alpha_over_rank``: the scale of a LoKr module whose two factors are both full.
    ``one``: alpha is ignored (LyCORIS, A1111, ComfyUI); ``alpha_over_rank``: PEFT's alpha/r.
    lyco writes ``one`` (and folds any other scale into ``lokr_w1``).
``lyco_source_format``
    The format the adapter was decoded from before it was re-written (``kohya``, ``peft``, …).
``lyco_family``
    ``sd1``, ``sd2`` or ``sdxl``: the model family the adapter was made for (read back by
    :mod:`lyco.formats.kohya` before it guesses from shapes).
``lyco_train_config``
    JSON of the training config that produced the file (paths reduced to their last component).

None of them start with ``ss_``, so they never change the ``sshs_*`` hashes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import struct
import time
import unicodedata
from typing import Any, Mapping

# --------------------------------------------------------------------------------------
# kohya ss_* keys
# --------------------------------------------------------------------------------------

#: kept by sd-scripts even with ``--no_metadata``
SS_MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                   "ss_network_alpha", "ss_network_args")

FAMILIES = ("sd1", "sd2", "sdxl")

_BASE_MODEL_VERSION = {("sd1", False): "sd_v1", ("sd1", True): "sd_v1_v",
                       ("sd2", False): "sd_v2", ("sd2", True): "sd_v2_v",
                       ("sdxl", False): "sdxl_base_v1-0", ("sdxl", True): "sdxl_base_v1-0"}

ARCH_SD1 = "stable-diffusion-v1"
ARCH_SD2_512 = "stable-diffusion-v2-512"
ARCH_SD2_768_V = "stable-diffusion-v2-768-v"
ARCH_SDXL = "stable-diffusion-xl-v1-base"
IMPL_SGM = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
MODELSPEC_VERSION = "1.0.1"


def base_model_version(family: str, v_pred: bool = False) -> str:
    """kohya's ``ss_base_model_version`` for a model family."""
    _check_family(family)
    return _BASE_MODEL_VERSION[(family, bool(v_pred))]


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The family (``sd1``/``sd2``/``sdxl``) from ``lyco_family``, ``ss_*`` or ``modelspec.*`` keys, or None."""
    if metadata.get("lyco_family") in FAMILIES:
        return metadata["lyco_family"]
    v = metadata.get("ss_base_model_version", "")
    if v.startswith("sdxl"):
        return "sdxl"
    if v.startswith("sd_v2"):
        return "sd2"
    if v.startswith("sd_v1"):
        return "sd1"
    arch = metadata.get("modelspec.architecture", "")
    if arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if arch.startswith("stable-diffusion-v1"):
        return "sd1"
    if str(metadata.get("ss_v2", "")).lower() == "true":
        return "sd2"
    return None


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        from ..errors import ConfigError
        raise ConfigError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")


def _num_str(x: Any) -> str:
    return str(x)  # kohya writes str(value): "16", "16.0" or "Dynamic" as given


def network_info(adapter) -> dict[str, Any]:
    """``dim``, ``alpha``, ``network_module`` and ``network_args`` for :func:`build_minimum_metadata`.

    dim/alpha are the most common rank/alpha of the non-conv modules (conv modules give
    ``conv_dim``/``conv_alpha`` in the args); ``network_module`` is ``networks.lora`` when every
    module is plain LoRA/LoCon (what kohya's own loader reads) and ``lycoris.kohya`` otherwise.
    """
    from collections import Counter

    from .. import algorithms
    from ..errors import ConfigError
    lin: Counter = Counter()
    conv: Counter = Counter()
    algos: Counter = Counter()
    plain = True
    for m in adapter.modules.values():
        try:
            alg = algorithms.get(m.algo)
            rank = alg.rank(m.tensors)
            canon = alg.name
        except (ConfigError, KeyError, NotImplementedError):
            rank, canon = None, m.algo
        algos[canon] += 1
        if canon not in ("lora", "dylora") or m.is_dora or "lora_mid.weight" in m.tensors:
            plain = False
        if rank is None:
            continue
        a = m.tensors.get("alpha")
        alpha = float(a.reshape(-1)[0]) if a is not None and a.numel() else float(rank)
        is_conv = any(t.dim() >= 3 for k, t in m.tensors.items() if k not in ("alpha", "dora_scale"))
        (conv if is_conv else lin)[(rank, alpha)] += 1
    main = lin or conv
    dim, alpha = main.most_common(1)[0][0] if main else (0, 0.0)
    args: dict[str, Any] = {}
    if not plain:
        args["algo"] = algos.most_common(1)[0][0] if algos else "lora"
    if conv:
        cd, ca = conv.most_common(1)[0][0]
        args["conv_dim"], args["conv_alpha"] = cd, ca
    if any(m.is_dora for m in adapter.modules.values()):
        args["dora_wd"] = True
        axis = get_lyco(adapter.metadata, LYCO_DORA_AXIS, "output")
        args["wd_on_output"] = axis == "output"
    return {"dim": dim, "alpha": alpha, "network_args": args,
            "network_module": "networks.lora" if plain else "lycoris.kohya"}


def build_minimum_metadata(*, family: str, dim: int | str, alpha: float | str | None,
                           network_module: str = "lycoris.kohya",
                           network_args: Mapping[str, Any] | None = None, v_pred: bool = False,
                           output_name: str | None = None, title: str | None = None,
                           resolution: str | tuple[int, int] | None = None,
                           timestamp: float | None = None, modelspec: bool = True,
                           extra_modelspec: Mapping[str, str] | None = None) -> dict[str, str]:
    """The keys every loader looks at: kohya's minimum ``ss_*`` set, ``ss_output_name`` and ModelSpec.

    ``dim``/``alpha`` are the global (most common) rank and alpha (``alpha=None`` ⇒ ``dim``);
    ``network_args`` is stored as JSON with its values as strings, as kohya passes
    ``--network_args key=value`` (e.g. ``{"algo": "lokr", "conv_dim": "4"}``).
    """
    _check_family(family)
    args = {str(k): (json.dumps(v) if isinstance(v, (list, dict)) else str(v))
            for k, v in (network_args or {}).items()}
    md = {
        "ss_network_module": str(network_module),
        "ss_network_dim": str(dim),
        "ss_network_alpha": _num_str(dim if alpha is None else alpha),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": base_model_version(family, v_pred),
        "ss_v2": str(family == "sd2"),
    }
    if output_name is not None:
        md["ss_output_name"] = str(output_name)
    if modelspec:
        md.update(build_modelspec(family=family, v_pred=v_pred, title=title or output_name,
                                  resolution=resolution, timestamp=timestamp, extra=extra_modelspec))
    return md


def modelspec_architecture(family: str, v_pred: bool = False, kind: str = "lora") -> str:
    _check_family(family)
    if family == "sdxl":
        arch = ARCH_SDXL
    elif family == "sd2":
        arch = ARCH_SD2_768_V if v_pred else ARCH_SD2_512
    else:
        arch = ARCH_SD1
    return f"{arch}/{kind}" if kind else arch


def build_modelspec(*, family: str, v_pred: bool = False, title: str | None = None,
                    resolution: str | tuple[int, int] | None = None, timestamp: float | None = None,
                    kind: str = "lora", extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """SAI ModelSpec 1.0.1 keys as sd-scripts writes them for a LoRA."""
    _check_family(family)
    ts = time.time() if timestamp is None else float(timestamp)
    if resolution is None:
        side = 1024 if family == "sdxl" else 768 if (family == "sd2" and v_pred) else 512
        res = f"{side}x{side}"
    elif isinstance(resolution, str):
        res = resolution
    elif isinstance(resolution, int):
        res = f"{resolution}x{resolution}"
    else:
        res = f"{int(resolution[0])}x{int(resolution[1])}"
    md = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(family, v_pred, kind),
        "modelspec.implementation": IMPL_SGM if family == "sdxl" else IMPL_DIFFUSERS,
        "modelspec.title": title if title else f"LoRA@{_dt.datetime.fromtimestamp(int(ts)).isoformat()}",
        "modelspec.resolution": res,
        "modelspec.date": _dt.datetime.fromtimestamp(int(ts)).isoformat(),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
    }
    for k, v in (extra or {}).items():
        key = k if k.startswith("modelspec.") else "modelspec." + k
        md[key] = str(v)
    return md


# --------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------

LEGACY_OFFSET = 0x100000  # 1 MiB
LEGACY_LENGTH = 0x10000   # 64 KiB


def _header_end(buf: bytes | memoryview) -> int:
    if len(buf) < 8:
        raise ValueError("serialised safetensors shorter than 8 bytes")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    return 8 + n


def precalculate_hashes(tensors: Mapping, metadata: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya computes them before saving.

    Only ``ss_*`` metadata takes part. The tensors + that metadata are serialised in memory with
    safetensors; the model hash is the sha256 of the bytes after the header, the legacy hash the
    first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB of the whole serialisation.
    Pass the tensors exactly as they will be saved (after the dtype cast).
    """
    from .safetensors_io import serialize
    ss = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    data = serialize(tensors, ss)
    view = memoryview(data)
    model_hash = hashlib.sha256(view[_header_end(view):]).hexdigest()
    legacy_hash = hashlib.sha256(view[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def add_hashes(tensors: Mapping, metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` plus ``sshs_model_hash`` and ``sshs_legacy_hash`` for these tensors."""
    model_hash, legacy_hash = precalculate_hashes(tensors, metadata)
    out = dict(metadata)
    out["sshs_model_hash"] = model_hash
    out["sshs_legacy_hash"] = legacy_hash
    return out


_CHUNK = 1 << 20


def addnet_hash_of_file(path) -> str:
    """sha256 of the data section of an existing safetensors file (what A1111 calls the addnet hash)."""
    from ..errors import FormatError
    p = str(path)
    size = os.path.getsize(p)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError("file is shorter than a safetensors header", file=p)
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise FormatError(f"header length {n} runs past the end of the file", file=p)
        f.seek(8 + n)
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sd_model_hashes(path) -> tuple[str, str]:
    """``(ss_sd_model_hash, ss_new_sd_model_hash)`` of a base model file.

    The old webui hash is the first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB;
    the new one is the sha256 of the whole file.
    """
    p = str(path)
    full = hashlib.sha256()
    with open(p, "rb") as f:
        f.seek(LEGACY_OFFSET)
        old = hashlib.sha256(f.read(LEGACY_LENGTH)).hexdigest()[:8]
        f.seek(0)
        while chunk := f.read(_CHUNK):
            full.update(chunk)
    return old, full.hexdigest()


# --------------------------------------------------------------------------------------
# Safe display
# --------------------------------------------------------------------------------------

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _escape_char(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    if unicodedata.category(ch) in _UNSAFE_CATEGORIES:
        o = ord(ch)
        return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"
    return ch


def safe_display(value: Any, max_len: int = 200) -> str:
    """A metadata value made safe to print on a terminal.

    Control characters, terminal escape sequences (ESC, CSI), bidi overrides, zero-width and other
    invisible format characters are shown as ``\\xNN``/``\\uNNNN`` escapes (newlines as ``\\n``);
    the result is cut to about ``max_len`` characters with a note of how much was left out.
    """
    s = value if isinstance(value, str) else str(value)
    max_len = max(1, int(max_len))
    out: list[str] = []
    used = 0
    for i, ch in enumerate(s):
        e = _escape_char(ch)
        if used + len(e) > max_len:
            out.append(f"… (+{len(s) - i} chars)")
            break
        out.append(e)
        used += len(e)
    return "".join(out)


# --------------------------------------------------------------------------------------
# lyco's own keys
# --------------------------------------------------------------------------------------

LYCO_PREFIX = "lyco_"
LYCO_VERSION = "lyco_version"
LYCO_DORA_AXIS = "lyco_dora_axis"
LYCO_OFT_CONSTRAINT = "lyco_oft_constraint"
LYCO_LOKR_FULL_SCALE = "lyco_lokr_full_scale"
LYCO_SOURCE_FORMAT = "lyco_source_format"
LYCO_FAMILY = "lyco_family"
LYCO_TRAIN_CONFIG = "lyco_train_config"

#: every lyco_* key, with its allowed values (None = any string); see the module docstring
LYCO_KEYS: dict[str, tuple[str, ...] | None] = {
    LYCO_VERSION: None,
    LYCO_DORA_AXIS: ("output", "input"),
    LYCO_OFT_CONSTRAINT: ("lycoris", "comfyui"),
    LYCO_LOKR_FULL_SCALE: ("one", "alpha_over_rank"),
    LYCO_SOURCE_FORMAT: None,
    LYCO_FAMILY: FAMILIES,
    LYCO_TRAIN_CONFIG: None,
}


def _lyco_key(name: str) -> str:
    key = name if name.startswith(LYCO_PREFIX) else LYCO_PREFIX + name
    if key not in LYCO_KEYS:
        from ..errors import ConfigError
        raise ConfigError(f"unknown lyco metadata key {name!r}; known: {', '.join(LYCO_KEYS)}")
    return key


def set_lyco(metadata: dict[str, str], name: str, value: Any) -> dict[str, str]:
    """Set a ``lyco_*`` key (``name`` with or without the prefix), checking the allowed values."""
    key = _lyco_key(name)
    v = str(value)
    allowed = LYCO_KEYS[key]
    if allowed is not None and v not in allowed:
        from ..errors import ConfigError
        raise ConfigError(f"metadata {key}: {v!r} is not one of {', '.join(allowed)}")
    metadata[key] = v
    return metadata


def get_lyco(metadata: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    """Read a ``lyco_*`` key; an unknown value for a key with a fixed set reads as ``default``."""
    key = _lyco_key(name)
    v = metadata.get(key)
    if v is None:
        return default
    allowed = LYCO_KEYS[key]
    if allowed is not None and v not in allowed:
        return default
    return v


def lyco_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Only the ``lyco_*`` keys."""
    return {k: v for k, v in metadata.items() if k.startswith(LYCO_PREFIX)}


def stamp_version(metadata: dict[str, str]) -> dict[str, str]:
    from .. import __version__
    metadata[LYCO_VERSION] = __version__
    return metadata


# --------------------------------------------------------------------------------------
# Everything a kohya/LyCORIS file gets from an Adapter
# --------------------------------------------------------------------------------------

_OFT_ALGOS = ("diag-oft", "oft", "boft")
_DROP_ON_WRITE = ("format", "lora_adapter_metadata")


def dora_axis_of(tensors: Mapping[str, Any]) -> str | None:
    """``output``/``input`` when every ``dora_scale`` (keys named ``dora_scale`` or ``….dora_scale``)
    says so by its shape, None when there is none, they disagree, or all are 1-wide."""
    axes = set()
    for k, t in tensors.items():
        if not (k == "dora_scale" or k.endswith(".dora_scale")) or t.dim() < 2:
            continue
        if t.shape[0] > 1 and t.numel() == t.shape[0]:
            axes.add("output")
        elif t.shape[0] == 1 and t.numel() > 1 and t.numel() == t.shape[1]:
            axes.add("input")
    return axes.pop() if len(axes) == 1 else None


def adapter_metadata(adapter, state_dict: Mapping[str, Any] | None = None, *,
                     timestamp: float | None = None) -> dict[str, str]:
    """The header of a kohya/LyCORIS file for ``adapter``: its own metadata plus what is missing.

    * keeps the adapter's metadata (the provenance of a file read earlier) except stale
      ``sshs_*`` hashes and diffusers' ``format``/``lora_adapter_metadata``;
    * fills kohya's minimum ``ss_*`` keys that are absent — from ``adapter.create_args`` when the
      adapter was created by lyco, else from its content (:func:`network_info`); the family keys
      only when the family is known; ``ss_network_module`` is corrected to ``lycoris.kohya`` when
      the content is not plain LoRA (kohya's own loader would drop it);
    * adds ModelSpec when absent and the family is known;
    * records lyco's choices: ``lyco_version``, ``lyco_family``, ``lyco_dora_axis`` (from the
      ``dora_scale`` shapes of ``state_dict`` — the tensors as written — or of the adapter),
      ``lyco_lokr_full_scale`` and ``lyco_oft_constraint`` when such modules are present.
    """
    md: dict[str, str] = {str(k): str(v) for k, v in adapter.metadata.items()
                          if not str(k).startswith("sshs_") and k not in _DROP_ON_WRITE}
    info = network_info(adapter)
    ca = dict(getattr(adapter, "create_args", None) or {})
    if ca.get("rank") is not None:
        dim = ca["rank"]
        alpha = ca.get("alpha") if ca.get("alpha") not in (None, 0) else dim
        args: dict[str, Any] = {"algo": ca.get("algo", "lora")}
        if ca.get("preset") is not None:
            args["preset"] = ca["preset"]
        for src, dst in (("conv_rank", "conv_dim"), ("conv_alpha", "conv_alpha")):
            if ca.get(src) is not None:
                args[dst] = ca[src]
        for k, v in ca.items():
            if k not in ("algo", "rank", "alpha", "preset", "conv_rank", "conv_alpha") and v is not None:
                args[k] = v
        module = info["network_module"]
    else:
        dim, alpha, args, module = info["dim"], info["alpha"], info["network_args"], info["network_module"]
    md.setdefault("ss_network_module", module)
    if module == "lycoris.kohya" and md["ss_network_module"] == "networks.lora":
        md["ss_network_module"] = module
    md.setdefault("ss_network_dim", str(dim))
    md.setdefault("ss_network_alpha", str(alpha))
    if "ss_network_args" not in md:
        md["ss_network_args"] = json.dumps({str(k): (json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                                            for k, v in args.items()})
    family = adapter.family if adapter.family in FAMILIES else family_from_metadata(md)
    if family is not None:
        v_pred = (md.get("modelspec.prediction_type") == "v"
                  or md.get("ss_base_model_version", "").endswith("_v"))
        md.setdefault("ss_base_model_version", base_model_version(family, v_pred))
        md.setdefault("ss_v2", str(family == "sd2"))
        if "modelspec.sai_model_spec" not in md:
            md.update(build_modelspec(family=family, v_pred=v_pred,
                                      title=md.get("modelspec.title") or md.get("ss_output_name"),
                                      timestamp=timestamp))
        md[LYCO_FAMILY] = family
    stamp_version(md)
    axis = dora_axis_of(state_dict) if state_dict is not None else None
    if axis is None:
        axis = dora_axis_of({f"{n}.{k}": t for n, m in adapter.modules.items() for k, t in m.tensors.items()})
    if axis is not None:
        md[LYCO_DORA_AXIS] = axis
    algos = {m.algo.lower().replace("_", "-") for m in adapter.modules.values()}
    if any(m.algo == "lokr" and "lokr_w1" in m.tensors and "lokr_w2" in m.tensors
           for m in adapter.modules.values()):
        md[LYCO_LOKR_FULL_SCALE] = "one"
    if algos & set(_OFT_ALGOS):
        md.setdefault(LYCO_OFT_CONSTRAINT, "lycoris")
    return md

"""``lyco convert``: between kohya/LyCORIS and diffusers/PEFT files, naming styles, dtypes; metadata.

Targets (``to``):

* ``kohya`` (alias ``lycoris``): a kohya/LyCORIS file, every algorithm kept as it is (exact). The
  UNet naming style is ``naming`` (``auto``: diffusers names for SD1/SD2, LDM/SGM names for SDXL,
  what kohya writes; ``diffusers`` or ``ldm`` force one).
* ``lora``: a kohya file in which every module is a plain LoRA/LoCon (what kohya's own loader and
  every tool read).
* ``diffusers`` (alias ``peft``): diffusers' LoRA format (``<component>.<path>.lora_A/B.weight`` plus
  the ``lora_adapter_metadata`` LoraConfig), loadable with ``pipe.load_lora_weights``;
  ``bake_scale`` folds each module's scale into ``lora_B`` for loaders that ignore that header.

Going to LoRA is exact where the algebra allows: a Tucker LoCon folds its core into ``lora_down``,
a LoHa is a rank r1·r2 LoRA through its Khatri–Rao form, a LoKr a rank rank(W1)·rank(W2) LoRA
through its Kronecker factors; DoRA keeps its ``dora_scale``. With ``rank`` (or for a Full
module, or a weight-dependent one — IA3, OFT, GLoRA, which need ``base``) the module goes through
an SVD and the relative Frobenius error is reported and stored (``lyco.errors``). Norm modules
and Full modules with a bias delta (``diff_b``) have no LoRA form and are refused for LoRA targets.

Metadata: ``strip_meta`` drops the input's metadata (the writer then adds only the minimum keys
loaders use: kohya's ``ss_*`` minimum, ModelSpec, ``lyco_*``); ``set_meta`` (``KEY=VALUE``) is applied
last and wins.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from ..adapter import Adapter, ModuleAdapter
from ..errors import ConfigError
from ._common import (
    BaseLookup, adapter_dtype, check_output, errors_json, load_adapter, lowrank_error_report, parse_dtype, say,
    set_meta_pairs, to_lora, weight_shape,
)

TARGETS = {"kohya": "kohya", "lycoris": "kohya", "lora": "lora", "diffusers": "diffusers", "peft": "diffusers"}


@dataclass
class ConvertResult:
    adapter: Adapter
    errors: dict[str, float] = field(default_factory=dict)
    converted: dict[str, str] = field(default_factory=dict)  # name → "loha → lora (exact)" …
    output: str | None = None


def _is_plain_lora(ma: ModuleAdapter) -> bool:
    return ma.algo.lower().replace("_", "-") in ("lora", "locon", "dylora") and "lora_mid.weight" not in ma.tensors


def as_lora(a: Adapter, rank: int | None = None, lookup: BaseLookup | None = None) -> ConvertResult:
    """Every module of ``a`` as a LoRA (exact where possible; see the module doc)."""
    res = ConvertResult(Adapter())
    mods: dict[str, ModuleAdapter] = {}
    bad = [n for n, m in a.modules.items() if m.algo.lower() == "norm"]
    if bad:
        raise ConfigError(f"{len(bad)} Norm module(s) (e.g. {bad[0]!r}) have no LoRA form; convert to kohya "
                          f"instead, or remove them")
    biased = [n for n, m in a.modules.items() if "diff_b" in m.tensors]
    if biased:
        raise ConfigError(f"{len(biased)} Full module(s) (e.g. {biased[0]!r}) carry a bias delta (diff_b), which "
                          f"a LoRA cannot hold; convert to kohya instead")
    for name, ma in a.modules.items():
        if _is_plain_lora(ma) and rank is None:
            mods[name] = ma
            continue
        shape = weight_shape(name, ma, a.family, lookup.specs if lookup else None)
        weight = None
        if not ma.algorithm.weight_independent and lookup is not None and (
                "dora_scale" not in ma.tensors or not ma.algorithm.inner.weight_independent):
            weight = lookup.weight(name)
        t, err, r = to_lora(name, ma, shape, rank, weight=weight)
        mods[name] = ModuleAdapter("lora", t)
        res.errors[name] = err
        res.converted[name] = (f"{ma.algo}{'+dora' if 'dora_scale' in ma.tensors else ''} → lora rank {r} "
                               + ("(exact)" if err == 0.0 else f"(rel.err {err:.3e})"))
    res.adapter = Adapter(mods, dict(a.metadata), a.family, a.source, dict(a.create_args))
    return res


def convert(adapter, out, *, to: str = "kohya", dtype=None, naming: str = "auto", set_meta=None,
            strip_meta: bool = False, rank: int | None = None, base=None, bake_scale: bool = False,
            overwrite: bool = False, verbose: bool = True) -> ConvertResult:
    """Convert ``adapter`` (a path or an Adapter) and write ``out``; see the module documentation."""
    t0 = time.time()
    target = TARGETS.get(str(to).lower())
    if target is None:
        raise ConfigError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if rank is not None and target == "kohya":
        raise ConfigError("--rank applies to --to lora/diffusers (a conversion to LoRA); "
                          "to change a LoRA's rank in kohya format use `lyco resize`")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be ≥ 1, got {rank}")
    if naming not in ("auto", "diffusers", "ldm"):
        raise ConfigError(f"--naming must be diffusers or ldm, got {naming!r}")
    if naming != "auto" and target == "diffusers":
        raise ConfigError("--naming applies to kohya files; diffusers files always use diffusers names")
    src_is_path = not isinstance(adapter, Adapter)
    out = check_output(out, ([adapter] if src_is_path else []) + ([base] if base is not None else []),
                       overwrite=overwrite)
    a = load_adapter(adapter)
    dt = parse_dtype(dtype)
    extra = set_meta_pairs(set_meta)
    if strip_meta:
        a = Adapter(dict(a.modules), {}, a.family, a.source, {})
    res = ConvertResult(a)
    if target in ("lora", "diffusers"):
        lookup = BaseLookup(base) if base is not None else None
        try:
            if lookup is not None:
                lookup.add(a)
            res = as_lora(a, rank, lookup)
        finally:
            if lookup is not None:
                lookup.close()
        if res.errors:
            res.adapter.metadata["lyco.errors"] = errors_json(res.errors)
            res.adapter.metadata["lyco.tool"] = json.dumps({"verb": "convert", "to": target, "rank": rank})
    a2 = res.adapter
    if target == "diffusers":
        from ..formats import peft
        from ..formats.safetensors_io import save_tensors
        tensors, meta = peft.to_peft(a2, bake_scale=bake_scale)
        if dt is not None:
            tensors = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in tensors.items()}
        meta.update(extra)
        save_tensors(tensors, out, meta, overwrite=overwrite)
    else:
        a2.save(out, dtype=dt or adapter_dtype(a2), metadata=extra, naming=naming, overwrite=overwrite)
    res.output = str(out)
    if verbose:
        for n, what in res.converted.items():
            say(f"  {n}: {what}")
        if res.errors:
            say(lowrank_error_report(res.errors))
        say(f"wrote {out} ({target}, {len(a2)} modules, {time.time() - t0:.1f} s)")
    return res

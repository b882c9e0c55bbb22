"""``lyco combine``: several adapters → one, ``ΔW = Σ_i w_i·ΔW_i`` per module.

* **Exact by concatenation** wherever every contribution has a low-rank form (LoRA/LoCon, Tucker
  LoCon, LoHa via Khatri–Rao, LoKr via Kronecker factors): each file's scale·weight is folded into
  its up factor and the factors are stacked along the rank axis, ``up = [w₁γ₁up₁ | w₂γ₂up₂ | …]``,
  ``down = [down₁; down₂; …]``, ``alpha = total rank`` (scale 1). The product is the weighted sum
  exactly (unlike adding the factors, kohya's default).
* Norm modules add their ``w_norm``/``b_norm`` (exact).
* Anything else (Full, or weight-dependent IA3/OFT/GLoRA/DoRA, which need ``base``) is summed densely
  and stored as Full ``diff`` (exact), or as a LoRA with ``rank``.
* ``rank`` (``conv_rank`` for k×k convs) caps the result: a module above it is truncated by SVD
  (two QRs and a small SVD for concatenated factors, ΔW never formed) and its relative Frobenius
  error is reported and stored (``lyco.errors``). A module with a bias delta (Full ``diff_b``) stays
  Full: a LoRA has no place for it.

Weight-dependent modules combine as stacked adapters act: ``ΔW = Σ_i (merged_i(W, w_i) − W)``.
Inputs are ``path[:w[:te_w]]`` (a text-encoder weight may differ from the UNet one).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

from ..adapter import TEXT_COMPONENTS, Adapter, ModuleAdapter, split_name
from ..errors import ConfigError, FamilyMismatch, ShapeMismatch
from ..formats.metadata import family_from_metadata
from ._common import (
    BaseLookup, adapter_dtype, check_output, dense_delta, dense_svd, errors_json, factored_svd, is_kxk,
    load_adapter, lora_factors, lora_tensors, lowrank_error_report, parse_dtype, parse_weighted, save_result, say,
    spec_for, split_factors, weight_shape,
)


@dataclass
class CombineResult:
    adapter: Adapter
    errors: dict[str, float] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)
    output: str | None = None
    seconds: float = 0.0


def _parse(spec):
    if isinstance(spec, Adapter):
        return spec, 1.0, None
    if isinstance(spec, (tuple, list)):
        a, *ws = spec
        return a, float(ws[0]) if ws else 1.0, (float(ws[1]) if len(ws) > 1 else None)
    path, ws = parse_weighted(str(spec), 2)
    return path, (ws[0] if ws else 1.0), (ws[1] if len(ws) > 1 else None)


def _family(adapters: list[Adapter]) -> str | None:
    fams = {}
    for a in adapters:
        f = a.family or family_from_metadata(a.metadata)
        if f:
            fams.setdefault(f, a.source)
    if len(fams) > 1:
        (f1, s1), (f2, s2) = list(fams.items())[:2]
        raise FamilyMismatch(f2, f1, file=s2)
    return next(iter(fams), None)


def combine(adapters: Iterable, out=None, *, rank: int | None = None, conv_rank: int | None = None,
            base=None, dtype=None, overwrite: bool = False, verbose: bool = True) -> CombineResult:
    """Combine ``adapters`` (paths ``"a.safetensors:0.7"``, ``(adapter, w[, te_w])`` or Adapters)."""
    t0 = time.time()
    specs = [_parse(s) for s in adapters]
    if len(specs) < 1:
        raise ConfigError("nothing to combine")
    for nm, v in (("--rank", rank), ("--conv-rank", conv_rank)):
        if v is not None and v < 1:
            raise ConfigError(f"{nm} must be ≥ 1, got {v}")
    paths = [p for p, _, _ in specs if not isinstance(p, Adapter)]
    if out is not None:
        out = check_output(out, paths + ([base] if base is not None else []), overwrite=overwrite)
    loaded = [(load_adapter(p), w, tw) for p, w, tw in specs]
    family = _family([a for a, _, _ in loaded])
    dt = parse_dtype(dtype) or adapter_dtype(loaded[0][0])
    lookup = BaseLookup(base) if base is not None else None
    parts: dict[str, list[tuple[ModuleAdapter, float]]] = {}
    res = CombineResult(Adapter())
    try:
        if lookup is not None:
            for a, _, _ in loaded:
                lookup.add(a)
        for a, w, tw in loaded:
            for name, ma in a.modules.items():
                m = tw if (tw is not None and split_name(name)[0] in TEXT_COMPONENTS) else w
                if m != 0:
                    parts.setdefault(name, []).append((ma, float(m)))
        specs_map = lookup.specs if lookup else None
        mods: dict[str, ModuleAdapter] = {}
        for name, ps in parts.items():
            mods[name] = _combine_module(name, ps, family, specs_map, lookup, rank, conv_rank, res)
    finally:
        if lookup is not None:
            lookup.close()
    labels = [f"{os.path.basename(str(a.source or 'adapter'))}×{w:g}" + (f"(te×{tw:g})" if tw is not None else "")
              for a, w, tw in loaded]
    meta = {"ss_training_comment": "combined by lyco: " + " + ".join(labels),
            "lyco.tool": json.dumps({"verb": "combine", "inputs": labels, "rank": rank, "conv_rank": conv_rank})}
    if res.errors:
        meta["lyco.errors"] = errors_json(res.errors)
    ranks = {int(m.tensors["lora_down.weight"].shape[0]) for m in mods.values() if "lora_down.weight" in m.tensors}
    if len(ranks) > 1:
        meta["ss_network_dim"] = meta["ss_network_alpha"] = "Dynamic"
    res.adapter = Adapter(mods, meta, family, None)
    res.seconds = round(time.time() - t0, 3)
    if verbose:
        kinds: dict[str, int] = {}
        for v in res.how.values():
            kinds[v] = kinds.get(v, 0) + 1
        say(f"combined {len(loaded)} adapter(s) into {len(mods)} module(s): "
            + ", ".join(f"{k} ×{v}" for k, v in sorted(kinds.items())))
        approx = {n: e for n, e in res.errors.items() if e > 0}
        if approx:
            say(lowrank_error_report(approx))
    return save_result(res, out, dt, overwrite, verbose)


def _combine_module(name, ps, family, specs_map, lookup, rank, conv_rank, res: CombineResult) -> ModuleAdapter:
    algos = {ma.algo.lower().replace("_", "-") for ma, _ in ps}
    if "norm" in algos:
        if algos != {"norm"}:
            raise ConfigError(f"module {name!r}: cannot combine Norm with {sorted(algos - {'norm'})}")
        out = {}
        for ma, w in ps:
            for k in ("w_norm", "b_norm"):
                if k in ma.tensors:
                    v = ma.tensors[k].double() * w
                    out[k] = v if k not in out else out[k] + v
        res.how[name] = "norm sum (exact)"
        res.errors[name] = 0.0
        return ModuleAdapter("norm", {k: v.float() for k, v in out.items()})
    shapes = set()
    for ma, _ in ps:
        try:
            shapes.add(tuple(weight_shape(name, ma, family, specs_map)))
        except ConfigError:
            if lora_factors(ma) is not None or ma.algorithm.weight_independent:
                raise
    if not shapes:
        raise ConfigError(f"module {name!r}: its ΔW depends on the base weight; pass the base model (--base MODEL)")
    if len({(s[0], math.prod(s[1:])) for s in shapes}) > 1:
        raise ShapeMismatch(name, sorted(shapes)[1], sorted(shapes)[0], detail="the inputs adapt different shapes")
    shape = max(shapes, key=len)
    cap = conv_rank if (is_kxk(shape) and conv_rank) else rank
    mn = min(shape[0], math.prod(shape[1:]))
    facs = [lora_factors(ma) for ma, _ in ps]
    if all(f is not None for f in facs):
        up = torch.cat([f[0] * w for f, (_, w) in zip(facs, ps)], dim=1)
        down = torch.cat([f[1] for f in facs], dim=0)
        R = up.shape[1]
        if (cap is None or cap >= R) and R <= mn:
            res.how[name] = "lora concat (exact)"
            res.errors[name] = 0.0
            return ModuleAdapter("lora", lora_tensors(up, down, shape, float(R)))
        svd = factored_svd(up, down)
        r = max(1, min(cap or mn, R, mn))
        u, d = split_factors(svd, r)
        err = math.sqrt(svd.tail2(r) / svd.total2) if svd.total2 else 0.0
        res.how[name] = "lora concat + svd" if cap is not None and cap < R else "lora concat (exact)"
        res.errors[name] = err if cap is not None and cap < R else 0.0
        return ModuleAdapter("lora", lora_tensors(u, d, shape, float(r)))
    # dense sum
    dw = torch.zeros(shape, dtype=torch.float64)
    db = None
    weight = None
    for (ma, w), f in zip(ps, facs):
        if f is not None:
            dw += (w * (f[0] @ f[1])).reshape(shape)
            continue
        alg = ma.algorithm
        if not alg.weight_independent:
            if lookup is None:
                raise ConfigError(f"module {name!r} ({ma.algo}{' + DoRA' if 'dora_scale' in ma.tensors else ''}): "
                                  f"its ΔW depends on the base weight; pass the base model (--base MODEL)")
            if weight is None:
                weight = lookup.weight(name).double()
            if getattr(alg, "linear_in_multiplier", True):
                dw += w * dense_delta(ma, shape, weight, dtype=torch.float64)
            else:
                t = {k: (v.double() if v.is_floating_point() else v) for k, v in ma.tensors.items()}
                w2, _ = alg.merged(t, spec_for(shape), weight.reshape(shape), None, w)
                dw += w2 - weight
        else:
            dw += w * dense_delta(ma, shape, None, dtype=torch.float64)
        if "diff_b" in ma.tensors:
            b = ma.tensors["diff_b"].double() * w
            db = b if db is None else db + b
    if cap is None or db is not None:
        # a bias delta (diff_b) has no place in a LoRA: such a module stays Full, exact
        res.how[name] = "dense sum → full (exact)" if cap is None else "dense sum → full (bias delta: no rank cap)"
        res.errors[name] = 0.0
        t = {"diff": dw.float()}
        if db is not None:
            t["diff_b"] = db.float()
        return ModuleAdapter("full", t)
    svd = dense_svd(dw.reshape(shape[0], -1), None, exact=True)
    r = max(1, min(cap, mn))
    u, d = split_factors(svd, r)
    res.how[name] = "dense sum + svd"
    res.errors[name] = math.sqrt(svd.tail2(r) / svd.total2) if svd.total2 else 0.0
    return ModuleAdapter("lora", lora_tensors(u, d, shape, float(r)))

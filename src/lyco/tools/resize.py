"""``lyco resize``: change the rank of a LoRA/LoCon (and turn LoHa/LoKr into LoRA) by SVD.

Per module, ΔW's exact low-rank factors (:func:`lyco.tools._common.lora_factors`: LoRA/LoCon,
Tucker LoCon, LoHa through its Khatri–Rao form, LoKr through its Kronecker factors) are
decomposed with two QRs and a small SVD (float64, ΔW is never formed), the new rank is chosen, and
the module is written as a LoRA with ``alpha_new = old_scale · new_rank`` so that the effective
scale is kept: ``ΔŴ = U_r·S_r·V_rᵀ`` exactly, the best rank-r approximation. DoRA modules keep their
``dora_scale``; Full, Norm, IA3, OFT and GLoRA modules are copied unchanged.

Rank rules (kohya ``resize_lora.py`` semantics, reimplemented from its description; ``rank`` is the
cap of the dynamic rules, ``conv_rank`` the one of k×k convs):
  fixed       ``rank`` (``conv_rank`` for k×k convs);
  sv_ratio    index = #{σ > σ_max / R}, clamped to [1, n−1]; new rank = index + 1;
  sv_cumulative  index = (first position where Σ_{j≤i}σ_j / Σσ ≥ C) + 1, clamped; new rank = index + 1;
  sv_fro      the same with σ² against F²;
and a module whose σ_max ≤ 1e-6 gets rank 1. Here n is the module's current rank (kohya uses
min(out, in), which can keep a direction of zero singular value; ours never does).

``prefix`` cuts every LoRA module to its first b rank components with alpha unchanged — the exact
DyLoRA cut (:func:`lyco.algorithms.lora.truncate`), no SVD.

Per-module relative Frobenius errors (‖ΔW − ΔŴ‖/‖ΔW‖ = √(Σ_{i>r}σ²/Σσ²)) and the total one are
printed and stored in the metadata (``lyco.errors``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

from ..adapter import Adapter, ModuleAdapter
from ..algorithms.lora import truncate
from ..errors import ConfigError
from ._common import (
    BaseLookup, adapter_dtype, check_output, errors_json, factored_svd, is_kxk, load_adapter, lora_factors,
    lora_tensors, lowrank_error_report, parse_dtype, save_result, say, strip_dora, weight_shape,
)

MIN_SV = 1e-6
METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


def kohya_rank(S: torch.Tensor, method: str | None, param: float | None, cap: int | None) -> int:
    """kohya's dynamic rank for singular values ``S`` (descending), capped at ``cap`` and len(S)."""
    s = S.double().flatten()
    n = int(s.numel())
    if n == 0 or float(s[0]) <= MIN_SV:
        return 1
    if method is None:
        r = int(cap) if cap else n
    elif method == "sv_ratio":
        idx = int((s > float(s[0]) / float(param)).sum())
        r = max(1, min(idx, n - 1)) + 1
    elif method in ("sv_cumulative", "sv_fro"):
        v = s if method == "sv_cumulative" else s * s
        target = float(param) if method == "sv_cumulative" else float(param) ** 2
        cs = torch.cumsum(v, 0) / float(v.sum())
        pos = int((cs < target).sum())  # searchsorted (left)
        r = max(1, min(pos + 1, n - 1)) + 1
    else:
        raise ConfigError(f"unknown dynamic method {method!r}; use one of {', '.join(METHODS)}")
    if cap:
        r = min(r, int(cap))
    return max(1, min(r, n))


@dataclass
class ResizeResult:
    adapter: Adapter
    errors: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, tuple[int | None, int]] = field(default_factory=dict)  # name → (old, new)
    kept: dict[str, str] = field(default_factory=dict)
    total_error: float = 0.0
    output: str | None = None
    seconds: float = 0.0


def _method(sv_ratio, sv_fro, sv_cumulative) -> tuple[str | None, float | None]:
    given = [(m, v) for m, v in (("sv_ratio", sv_ratio), ("sv_fro", sv_fro), ("sv_cumulative", sv_cumulative))
             if v is not None]
    if len(given) > 1:
        raise ConfigError("give at most one of --sv-ratio, --sv-fro, --sv-cumulative")
    if not given:
        return None, None
    m, v = given[0]
    if m == "sv_ratio" and v < 1:
        raise ConfigError(f"--sv-ratio must be ≥ 1 (σ_max / σ kept), got {v}")
    if m != "sv_ratio" and not 0 < v <= 1:
        raise ConfigError(f"--{m.replace('_', '-')} must be in (0, 1], got {v}")
    return m, float(v)


def resize(adapter, out=None, *, rank: int | None = None, sv_ratio: float | None = None,
           sv_fro: float | None = None, sv_cumulative: float | None = None, conv_rank: int | None = None,
           prefix: int | None = None, base=None, dtype=None, overwrite: bool = False,
           verbose: bool = True) -> ResizeResult:
    """Resize ``adapter`` (a path or an Adapter); write ``out`` when given. See the module doc."""
    t0 = time.time()
    method, param = _method(sv_ratio, sv_fro, sv_cumulative)
    if prefix is not None:
        if method is not None or rank is not None or conv_rank is not None:
            raise ConfigError("--prefix is an exact DyLoRA cut; it takes no other rank option")
        if prefix < 1:
            raise ConfigError(f"--prefix must be ≥ 1, got {prefix}")
    elif method is None and rank is None:
        raise ConfigError("give --rank N, a dynamic rule (--sv-ratio/--sv-fro/--sv-cumulative) or --prefix B")
    for nm, v in (("--rank", rank), ("--conv-rank", conv_rank)):
        if v is not None and v < 1:
            raise ConfigError(f"{nm} must be ≥ 1, got {v}")
    src = adapter if isinstance(adapter, Adapter) else None
    a = load_adapter(adapter)
    if out is not None:
        out = check_output(out, [] if src is not None else [adapter], overwrite=overwrite)
        if base is not None:
            check_output(out, [base], overwrite=overwrite)
    dt = parse_dtype(dtype) or adapter_dtype(a)
    res = ResizeResult(Adapter())
    lookup = BaseLookup(base) if base is not None else None
    try:
        if lookup is not None:
            lookup.add(a)
        mods: dict[str, ModuleAdapter] = {}
        conv_names: set[str] = set()
        tail2_sum = total2_sum = 0.0
        for name, ma in a.modules.items():
            algo = ma.algo.lower().replace("_", "-")
            if prefix is not None:
                if algo not in ("lora", "locon", "dylora"):
                    mods[name] = ma
                    res.kept[name] = f"{ma.algo}: not a LoRA"
                    continue
                old = ma.algorithm.rank(ma.tensors)
                if old <= prefix:
                    mods[name] = ma
                    res.kept[name] = f"rank {old} ≤ {prefix}"
                    continue
                t = truncate(ma.tensors, prefix)
                mods[name] = ModuleAdapter(ma.algo, t)
                full = lora_factors(strip_dora(ma))
                cut = lora_factors(strip_dora(mods[name]))
                d_full = full[0] @ full[1]
                d_cut = cut[0] @ cut[1]
                t2 = float(d_full.pow(2).sum())
                e2 = float((d_full - d_cut).pow(2).sum())
                res.errors[name] = math.sqrt(e2 / t2) if t2 else 0.0
                res.ranks[name] = (old, prefix)
                if ma.tensors["lora_down.weight"].dim() > 2 and any(k != 1 for k in ma.tensors["lora_down.weight"].shape[2:]):
                    conv_names.add(name)
                tail2_sum += e2
                total2_sum += t2
                continue
            inner = strip_dora(ma)
            fac = lora_factors(inner)
            if fac is None:
                mods[name] = ma
                res.kept[name] = f"{ma.algo}: no low-rank form (copied unchanged)"
                continue
            shape = weight_shape(name, inner, a.family, lookup.specs if lookup else None)
            up, down = fac
            svd = factored_svd(up, down)
            old_rank = inner.algorithm.rank(inner.tensors)
            if is_kxk(shape):
                conv_names.add(name)
            cap = conv_rank if (is_kxk(shape) and conv_rank) else rank
            new = kohya_rank(svd.S, method, param, cap)
            scale = float(inner.algorithm.scale({k: v.float() for k, v in inner.tensors.items()}))
            if scale == 0 or not math.isfinite(scale):
                scale = 1.0
            u = svd.U[:, :new] * (svd.S[:new] / scale)[None, :]
            t = lora_tensors(u, svd.Vh[:new], shape, scale * new, dtype=torch.float32)
            if "dora_scale" in ma.tensors:
                t["dora_scale"] = ma.tensors["dora_scale"]
            mods[name] = ModuleAdapter("lora", t)
            tail2 = svd.tail2(new)
            res.errors[name] = math.sqrt(tail2 / svd.total2) if svd.total2 else 0.0
            res.ranks[name] = (old_rank, new)
            tail2_sum += tail2
            total2_sum += svd.total2
    finally:
        if lookup is not None:
            lookup.close()
    res.total_error = math.sqrt(tail2_sum / total2_sum) if total2_sum else 0.0
    meta = dict(a.metadata)
    dyn = method is not None

    def summary(conv: bool):
        names = [n for n in res.ranks if (n in conv_names) == conv]
        news = {res.ranks[n][1] for n in names}
        olds = {res.ranks[n][0] for n in names}
        alphas = {float(mods[n].tensors["alpha"]) for n in names if "alpha" in mods[n].tensors}
        one = (lambda v: None if len(v) != 1 else next(iter(v)))
        return one(news), one(olds), one(alphas), bool(names)

    new_l, old_l, alpha_l, any_l = summary(False)
    new_c, _old_c, alpha_c, any_c = summary(True)
    if any_l or not any_c:
        meta["ss_network_dim"] = str(new_l) if new_l is not None and not dyn else "Dynamic"
        meta["ss_network_alpha"] = f"{alpha_l:g}" if alpha_l is not None and not dyn else "Dynamic"
    if any_c and "ss_network_args" in meta:
        try:
            nargs = json.loads(meta["ss_network_args"])
            if isinstance(nargs, dict):
                nargs["conv_dim"] = str(new_c) if new_c is not None and not dyn else "Dynamic"
                nargs["conv_alpha"] = f"{alpha_c:g}" if alpha_c is not None and not dyn else "Dynamic"
                meta["ss_network_args"] = json.dumps(nargs)
        except ValueError:
            pass
    old_s = str(old_l) if old_l is not None else "Dynamic"
    how = f"{method}={param}" if dyn else (f"prefix {prefix}" if prefix else f"rank {rank}")
    comment = meta.get("ss_training_comment", "")
    meta["ss_training_comment"] = (f"dimension is resized from {old_s} to {meta.get('ss_network_dim')} ({how}) by lyco"
                                   + (f"; {comment}" if comment else ""))
    meta["lyco.tool"] = json.dumps({"verb": "resize", "source": os.path.basename(str(a.source or "")),
                                    "rank": rank, "conv_rank": conv_rank, "method": method, "param": param,
                                    "prefix": prefix, "total_error": round(res.total_error, 7)})
    meta["lyco.errors"] = errors_json(res.errors)
    res.adapter = Adapter(mods, meta, a.family, None)
    res.seconds = round(time.time() - t0, 3)
    if verbose:
        w = min(90, max([len(n) for n in res.ranks] + [6]))
        for n, (o, nw) in res.ranks.items():
            say(f"  {n:<{w}}  rank {o if o is not None else '-':>5} → {nw:<5} rel.err {res.errors[n]:.3e}")
        if res.kept:
            say(f"  {len(res.kept)} module(s) copied unchanged (" +
                "; ".join(sorted({v for v in res.kept.values()})[:4]) + ")")
        say(f"resized {len(res.ranks)} module(s); {lowrank_error_report(res.errors)}; "
            f"total relative error {res.total_error:.3e}")
    return save_result(res, out, dt, overwrite, verbose)

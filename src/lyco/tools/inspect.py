"""``lyco inspect``: what is in an adapter file, per module and in total."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any

import torch

from ..adapter import Adapter, split_name
from ..algorithms.base import LayerSpec


def _delta_norm(ma) -> float | None:
    """‖ΔW‖_F from the tensors alone (the Frobenius norm does not depend on how ΔW is shaped, so a
    flattened ``(out, in·∏k)`` layout is enough when the file does not carry the kernel size);
    None when ΔW needs the base weight (OFT, IA3, GLoRA, DoRA)."""
    alg = ma.algorithm
    if not alg.weight_independent:
        return None
    shape = alg.infer_weight_shape(ma.tensors)
    if shape is None:
        from ._common import _flat_shape
        try:
            shape = _flat_shape(ma)
        except Exception:  # noqa: BLE001 — malformed tensors: no norm, not a crash
            shape = None
    if shape is None:
        return None
    shape = tuple(shape)
    if len(shape) == 1:
        spec = LayerSpec("layernorm", shape, normalized_shape=shape)
    else:
        spec = LayerSpec("linear" if len(shape) == 2 else f"conv{len(shape) - 2}d", shape)
    t = {k: (v.float() if v.is_floating_point() else v) for k, v in ma.tensors.items()}
    try:
        with torch.no_grad():
            return float(alg.delta_weight(t, spec).float().norm())
    except Exception:  # noqa: BLE001 — a norm is informative only
        return None


def _param_norm(ma) -> float:
    """‖θ‖ over the module's trained tensors (alpha and flags left out): what can be shown for
    algorithms whose ΔW needs the base weight."""
    tot = 0.0
    for k, v in ma.tensors.items():
        if k in ("alpha", "on_input") or not v.is_floating_point():
            continue
        tot += float(v.float().pow(2).sum())
    return math.sqrt(tot)


def block_of(name: str) -> str:
    """A coarse block label for plots and totals: component + first two path parts."""
    comp, path = split_name(name)
    parts = path.replace("_", ".").split(".") if "." not in path else path.split(".")
    if comp == "unet":
        if parts[0] in ("down_blocks", "up_blocks", "input_blocks", "output_blocks") and len(parts) > 1:
            return f"unet.{parts[0]}.{parts[1]}"
        return f"unet.{parts[0]}"
    if comp.startswith("text_encoder"):
        for i, p in enumerate(parts):
            if p == "layers" and i + 1 < len(parts):
                return f"{comp}.layers.{parts[i + 1]}"
        return comp
    return f"{comp}.{parts[0]}"


def inspect_adapter(adapter: Adapter, *, norms: bool = True) -> dict[str, Any]:
    from ..formats.metadata import safe_display  # noqa: F401 (display helpers live with metadata)
    mods = []
    total = 0
    for name, ma in adapter.modules.items():
        alg = ma.algorithm
        d = alg.describe(ma.tensors)
        n_params = sum(int(v.numel()) for k, v in ma.tensors.items() if k not in ("alpha", "on_input"))
        total += n_params
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in ma.tensors.values() if v.is_floating_point()})
        mods.append({
            "name": name,
            "algo": ma.algo + ("+dora" if ma.is_dora else ""),
            "rank": d.get("rank"),
            "alpha": d.get("alpha"),
            "scale": d.get("scale"),
            "shapes": {k: list(v.shape) for k, v in ma.tensors.items()},
            "dtype": ",".join(dtypes),
            "params": n_params,
            "delta_norm": _delta_norm(ma) if norms else None,
            "param_norm": _param_norm(ma) if norms else None,
        })
    size = os.path.getsize(adapter.source) if adapter.source and os.path.exists(adapter.source) else None
    blocks: "OrderedDict[str, float]" = OrderedDict()
    pblocks: "OrderedDict[str, float]" = OrderedDict()
    for m in mods:
        b = block_of(m["name"])
        if m["delta_norm"] is not None:
            blocks[b] = math.sqrt(blocks.get(b, 0.0) ** 2 + m["delta_norm"] ** 2)
        if m["param_norm"] is not None:
            pblocks[b] = math.sqrt(pblocks.get(b, 0.0) ** 2 + m["param_norm"] ** 2)
    return {
        "file": adapter.source,
        "file_size": size,
        "family": adapter.family,
        "modules": mods,
        "num_modules": len(mods),
        "num_params": total,
        "algorithms": adapter.algos(),
        "block_norms": dict(blocks),
        "block_param_norms": dict(pblocks),
        "metadata": dict(adapter.metadata),
    }


def format_report(info: dict[str, Any], *, max_meta: int = 200, show_modules: bool = True) -> str:
    from ..formats.metadata import safe_display
    lines = []
    lines.append(f"file:      {safe_display(str(info['file']), 300)}")
    if info["file_size"] is not None:
        lines.append(f"size:      {info['file_size'] / 1e6:.2f} MB")
    lines.append(f"family:    {info['family'] or 'unknown (generic or not recognised)'}")
    lines.append(f"modules:   {info['num_modules']}   parameters: {info['num_params']:,}")
    lines.append("algorithms: " + ", ".join(f"{k} ×{v}" for k, v in sorted(info["algorithms"].items())))
    if show_modules:
        lines.append("")
        w = max([len(m["name"]) for m in info["modules"]] + [6])
        w = min(w, 90)
        lines.append(f"{'module':<{w}}  {'algo':<10} {'rank':>5} {'alpha':>9} {'scale':>8} {'params':>9} {'|ΔW|':>9}  dtype")
        for m in info["modules"]:
            alpha = "-" if m["alpha"] is None else f"{m['alpha']:.4g}"
            scale = "-" if m["scale"] is None else f"{m['scale']:.4g}"
            norm = "-" if m["delta_norm"] is None else f"{m['delta_norm']:.4g}"
            rank = "-" if m["rank"] is None else str(m["rank"])
            name = safe_display(m["name"], w)
            lines.append(f"{name:<{w}}  {m['algo']:<10} {rank:>5} {alpha:>9} {scale:>8} {m['params']:>9,} {norm:>9}  {m['dtype']}")
    if info["metadata"]:
        lines.append("")
        lines.append("metadata:")
        for k in sorted(info["metadata"]):
            lines.append(f"  {safe_display(k, 80)}: {safe_display(info['metadata'][k], max_meta)}")
    return "\n".join(lines)


def plot_block_norms(info: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..formats.safetensors_io import atomic_write
    # ‖ΔW‖ per block when every module's ΔW is known without the base model; otherwise (OFT, IA3,
    # GLoRA, DoRA need the base weight) the norm of the adapter's own tensors per block
    ok = all(m["delta_norm"] is not None for m in info["modules"]) and info["block_norms"]
    blocks = info["block_norms"] if ok else info.get("block_param_norms") or {}
    if not blocks:
        from ..errors import LycoError
        raise LycoError("nothing to plot: the norms were not computed (--no-norms) or the file is empty")
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(blocks)), 4))
    ax.bar(range(len(blocks)), list(blocks.values()))
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels(list(blocks.keys()), rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("‖ΔW‖_F per block" if ok else "‖adapter tensors‖_F per block (ΔW needs the base)")
    ax.set_title(os.path.basename(str(info["file"])))
    fig.tight_layout()
    with atomic_write(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def inspect(adapter, *, norms: bool = True) -> dict[str, Any]:
    """What an adapter file (a path, or an :class:`~lyco.adapter.Adapter`) holds: per-module
    algorithm, rank, alpha, scale, shapes, dtype, parameters, ‖ΔW‖ (when it does not need the base
    weight) and ‖tensors‖, per-block norms, totals and the metadata (``lyco inspect --json``)."""
    if not isinstance(adapter, Adapter):
        from .. import load
        adapter = load(str(adapter), check_finite=False)
    return inspect_adapter(adapter, norms=norms)

"""``lyco merge``: bake one or more adapters into a base checkpoint, tensor by tensor.

The base is a diffusers folder (a diffusers folder is written) or a single-file SD1/SD2/SDXL
checkpoint (a single file in the same LDM/SGM layout is written, every key kept, unmapped ones
too). Nothing is loaded as a model: the module trees are built on the meta device (names, layer
kinds, shapes), each adapter module is planned onto a canonical weight, and the output is then
streamed in the file's order:

* a tensor no adapter touches is copied as raw bytes (or cast, with ``dtype``);
* a touched weight is read alone, in fp32 (fp64 stays fp64), every adapter's ``merged()`` is applied
  to it (each against the *base* weight: ``W' = W + Σ_i (merged_i(W, m_i) − W)``, as stacked
  adapters act at run time), and the result is cast once to the output dtype;
* a fused OpenCLIP ``in_proj_weight`` has its q/k/v row slices updated in place.

Peak memory is therefore about the largest touched tensor (a few copies in fp32) plus the adapters;
the checkpoint itself is never held. Outputs are written atomically; an output that resolves to an
input is refused and an existing one needs ``overwrite``.

A diffusers folder is copied file by file (configs, tokenizer, scheduler …); each component's weight
files are rewritten as safetensors, and other weight variants next to them (``*.fp16.safetensors``,
``.bin`` copies) are left out of the output, since they would still hold the unmerged weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..adapter import TEXT_COMPONENTS, Adapter, split_name
from ..algorithms.base import Algorithm
from ..errors import ConfigError, FormatError, ShapeMismatch, UnknownKeys
from ..layer import _accum_dtype  # the one accumulation-dtype rule (fp32; fp64 stays)
from ._common import Base, StreamWriter, check_family, check_output, load_adapter, parse_dtype, parse_weighted, \
    progress as _progress, release_memory, say

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")


@dataclass
class AdapterArg:
    """An adapter to merge: a path (or Adapter), its UNet weight and optional text-encoder weight."""

    adapter: Any
    weight: float = 1.0
    te_weight: float | None = None

    @classmethod
    def parse(cls, spec: "str | AdapterArg | Adapter | Sequence") -> "AdapterArg":
        if isinstance(spec, AdapterArg):
            return spec
        if isinstance(spec, Adapter):
            return cls(spec)
        if isinstance(spec, (tuple, list)):
            return cls(*spec)
        path, ws = parse_weighted(str(spec), 2)
        return cls(path, *ws)


@dataclass
class _Use:
    spec: Any
    alg: Any
    tensors: dict
    multiplier: float
    module: str


def _plain(alg) -> bool:
    """ΔW needs no base weight and merged() is the default W + m·ΔW: safe to add in place."""
    return alg.weight_independent and type(alg).merged is Algorithm.merged


def _apply(kind: str, uses: list[_Use], x: torch.Tensor, name: str, file: str) -> torch.Tensor:
    """The merged canonical tensor (weight or bias) in the accumulation dtype (fp32; fp64 stays).

    ``W' = W + Σ_i (merged_i(W, m_i) − W)``: each adapter against the base weight, as stacked
    adapters act at run time. Where an algorithm's merge is the plain ``W + m·ΔW`` the delta is
    added in place, so the peak is about three copies of the tensor in fp32.
    """
    acc = _accum_dtype(x.dtype)
    if kind == "w":
        for u in uses:
            if tuple(x.shape) != tuple(u.spec.weight_shape):
                raise ShapeMismatch(u.module, x.shape, u.spec.weight_shape, file=file, key=name,
                                    detail="the checkpoint's tensor differs from its config")
    x0 = x.to(acc, copy=True)
    with torch.no_grad():
        conv = [{k: (v.to(acc) if v.is_floating_point() else v) for k, v in u.tensors.items()} for u in uses]
        if kind == "b":
            for u, t in zip(uses, conv):
                db = u.alg.delta_bias(t, u.spec, x0)
                x0.add_(db.to(acc).reshape(x0.shape), alpha=u.multiplier)
            return x0
        if len(uses) == 1 and _plain(uses[0].alg):
            u = uses[0]
            x0.add_(u.alg.delta_weight(conv[0], u.spec, None).to(acc).reshape(x0.shape), alpha=u.multiplier)
            return x0
        delta = None
        for u, t in zip(uses, conv):
            if _plain(u.alg):
                d = u.alg.delta_weight(t, u.spec, None).to(acc).reshape(x0.shape) * u.multiplier
            else:
                w2, _ = u.alg.merged(t, u.spec, x0, None, u.multiplier)
                d = w2.to(acc) - x0
                if len(uses) == 1:
                    return w2.to(acc)
            delta = d if delta is None else delta.add_(d)
        return x0.add_(delta)


def merge(base, adapters: Iterable, out, *, dtype=None, allow_unmatched: bool = False,
          overwrite: bool = False, progress: bool = True, verbose: bool = True) -> dict[str, Any]:
    """Merge ``adapters`` into the checkpoint ``base`` and write ``out``.

    ``adapters``: paths (``"file.safetensors"``, ``"file.safetensors:0.8"``,
    ``"file.safetensors:0.8:0.5"`` = UNet weight 0.8, text-encoder weight 0.5), :class:`AdapterArg`
    or ``(adapter, weight, te_weight)`` tuples, or :class:`~lyco.adapter.Adapter` objects.
    ``dtype``: cast every floating tensor of the output (``fp16``, ``bf16``, ``fp32``); default keeps
    each tensor's dtype. Every adapter module must land on a weight of the checkpoint, else
    :class:`~lyco.errors.UnknownKeys` (or, with ``allow_unmatched``, they are listed and skipped).
    Returns a report (modules merged, tensors changed, unmatched modules, seconds).
    """
    t_start = time.time()
    args = [AdapterArg.parse(a) for a in adapters]
    if not args:
        raise ConfigError("no adapter to merge")
    loaded = [(load_adapter(a.adapter), a) for a in args]
    inputs = [base] + [a.adapter for a in args if not isinstance(a.adapter, Adapter)]
    out = check_output(out, inputs, overwrite=overwrite)
    out_dt = parse_dtype(dtype)
    base_path = Path(str(base))
    if not base_path.exists():
        raise FormatError("no such file or folder", file=str(base))
    if base_path.is_file() and out.suffix.lower() != ".safetensors":
        raise ConfigError(f"output {out}: a single-file merge is written as .safetensors; name it *.safetensors")

    report: dict[str, Any] = {"output": str(out), "adapters": [], "unmatched": {}, "modules": 0}
    with Base(base_path) as b:
        updates: dict[str, tuple[str, list[_Use]]] = {}
        for adapter, a in loaded:
            check_family(adapter, b.family, where=str(base))
            plan, unmatched = b.plan(adapter)
            label = adapter.source or "<adapter>"
            if unmatched:
                if not allow_unmatched:
                    raise UnknownKeys(unmatched, file=adapter.source,
                                      what=f"adapter modules with no matching weight in {base_path.name}",
                                      hint="pass --allow-unmatched (allow_unmatched=True) to skip them")
                report["unmatched"][label] = list(unmatched)
                say(f"{label}: {len(unmatched)} module(s) match no weight of the checkpoint and are skipped: "
                    + ", ".join(unmatched[:20]) + (" …" if len(unmatched) > 20 else ""), verbose)
            used = 0
            for canon, _mod, spec, ma in plan:
                comp = split_name(canon)[0]
                m = a.te_weight if (a.te_weight is not None and comp in TEXT_COMPONENTS) else a.weight
                if m == 0:
                    continue
                alg = ma.algorithm
                use = _Use(spec, alg, ma.tensors, float(m), canon)
                updates.setdefault(canon + ".weight", ("w", []))[1].append(use)
                if spec.has_bias and b.has(canon + ".bias"):
                    with torch.no_grad():
                        db = alg.delta_bias({k: v.float() if v.is_floating_point() else v
                                             for k, v in ma.tensors.items()}, spec, None)
                    if db is not None:
                        updates.setdefault(canon + ".bias", ("b", []))[1].append(use)
                used += 1
            report["modules"] += used
            report["adapters"].append({"file": label, "weight": a.weight, "te_weight": a.te_weight,
                                       "modules": used})
        by_key: dict[str, list] = {}
        for name in updates:
            ref = b.ck.mapping[name]
            by_key.setdefault(ref.key, []).append((name, ref))
        note = json.dumps([{"file": os.path.basename(str(x["file"])), "weight": x["weight"],
                            "te_weight": x["te_weight"]} for x in report["adapters"]])
        if b.ck.kind == "diffusers":
            changed = _write_folder(b, updates, by_key, out, out_dt, overwrite, note, progress)
        else:
            meta = dict(b.ck.metadata)
            meta["lyco.merge"] = note
            changed = _write_single(b, updates, by_key, out, out_dt, overwrite, meta, progress)
    report["tensors_changed"] = changed
    report["seconds"] = round(time.time() - t_start, 3)
    say(f"merged {report['modules']} module(s) from {len(loaded)} adapter(s) into {changed} tensor(s) "
        f"→ {out} ({report['seconds']:.1f} s)", verbose)
    return report


# --------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------


def _out_dtype(dt: torch.dtype, out_dt: torch.dtype | None) -> torch.dtype:
    return out_dt if (out_dt is not None and dt.is_floating_point) else dt


def _merged_file_tensor(b: Base, key: str, refs, updates, odt: torch.dtype) -> torch.Tensor:
    t = b.read_file_key(key)
    out = t.to(odt) if t.dtype != odt else t
    for name, ref in refs:
        kind, uses = updates[name]
        canon = ref.to_canonical(t)
        new = _apply(kind, uses, canon, name, str(b.path))
        filed = ref.to_file(new).to(odt)
        if ref.rows is not None:
            if out is t:
                out = t.clone()
            out[ref.rows[0]:ref.rows[1]] = filed
        else:
            out = filed
    return out


def _write_keys(b: Base, keys: list[str], inner: dict[str, str], updates, by_key, path: Path, out_dt,
                overwrite: bool, meta, bar) -> int:
    entries = []
    for k in keys:
        entries.append((inner[k], _out_dtype(b.ck.dtype(k), out_dt), tuple(b.ck.shape(k))))
    changed = 0
    with StreamWriter(path, entries, meta, overwrite=overwrite) as w:
        for (okey, odt, _shape), k in zip(entries, keys):
            if k in by_key:
                w.write(okey, _merged_file_tensor(b, k, by_key[k], updates, odt))
                changed += len(by_key[k])
                release_memory()
            else:
                src, src_key, piecewise = b.source_of(k)
                if piecewise and b.ck.dtype(k) == odt:
                    w.write_raw(okey, b.reader(src), src_key)
                else:
                    w.write(okey, b.read_file_key(k).to(odt))
            bar.update(1)
    return changed


def _data_order(b: Base, keys: list[str]) -> list[str]:
    """Keys in the order of their bytes in the file (sequential reads); others keep their order."""
    def off(k):
        src, inner, piecewise = b.source_of(k)
        if piecewise:
            return b.reader(src).info(inner).start
        return 0
    return sorted(keys, key=off)


def _write_single(b: Base, updates, by_key, out: Path, out_dt, overwrite, meta, show) -> int:
    keys = _data_order(b, b.ck.keys())
    with _progress(total=len(keys), desc="merge", unit="tensor", enabled=show) as bar:
        return _write_keys(b, keys, {k: k for k in keys}, updates, by_key, out, out_dt, overwrite, meta, bar)


def _bin_to_safetensors(name: str) -> str:
    if name == "pytorch_model.bin":
        return "model.safetensors"
    if name.endswith(".bin"):
        return name[:-4] + ".safetensors"
    return name


def _write_folder(b: Base, updates, by_key, out: Path, out_dt, overwrite, note, show) -> int:
    src_root = Path(b.path)
    per_file: dict[str, list[str]] = {}
    for k in b.ck.keys():
        path, _inner, _pw = b.source_of(k)
        per_file.setdefault(os.path.realpath(path), []).append(k)
    weight_dirs = {os.path.dirname(p) for p in per_file}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent)))
    changed = 0
    try:
        with _progress(total=len(b.ck.keys()), desc="merge", unit="tensor", enabled=show) as bar:
            for root, dirs, files in os.walk(src_root):
                dirs.sort()
                rel_root = Path(root).relative_to(src_root)
                (tmp / rel_root).mkdir(parents=True, exist_ok=True)
                for fn in sorted(files):
                    src = Path(root) / fn
                    real = os.path.realpath(src)
                    if real in per_file:
                        keys = _data_order(b, per_file[real])
                        name = fn if fn.endswith(".safetensors") else _bin_to_safetensors(fn)
                        if not fn.endswith(".safetensors") and any(Path(root).glob("*.bin.index.json")):
                            raise ConfigError(f"{src}: sharded .bin weights are not supported; convert the "
                                              f"folder to safetensors first")
                        inner = {k: b.source_of(k)[1] for k in keys}
                        meta = {"format": "pt"}
                        if fn.endswith(".safetensors"):
                            meta.update(b.reader(real).header.metadata)
                        meta["lyco.merge"] = note
                        changed += _write_keys(b, keys, inner, updates, by_key, tmp / rel_root / name, out_dt,
                                               False, meta, bar)
                    elif os.path.dirname(real) in weight_dirs and fn.endswith(_WEIGHT_SUFFIXES):
                        continue  # another variant of weights we rewrote: would be stale
                    elif fn.endswith(".safetensors.index.json") and os.path.dirname(real) in weight_dirs:
                        _copy_index(src, tmp / rel_root / fn, b, per_file, out_dt)
                    else:
                        shutil.copy2(src, tmp / rel_root / fn)
        _replace_folder(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return changed


def _copy_index(src: Path, dst: Path, b: Base, per_file, out_dt) -> None:
    data = json.loads(src.read_text())
    if out_dt is not None:
        total = 0
        for keys in per_file.values():
            for k in keys:
                dt = _out_dtype(b.ck.dtype(k), out_dt)
                n = 1
                for s in b.ck.shape(k):
                    n *= s
                total += n * torch.empty((), dtype=dt).element_size()
        data.setdefault("metadata", {})["total_size"] = total
    dst.write_text(json.dumps(data, indent=2))


def _replace_folder(tmp: Path, out: Path, overwrite: bool) -> None:
    if os.path.lexists(out):
        if not overwrite:
            raise ConfigError(f"output {out} already exists; pass --overwrite to replace it")
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=str(out.parent)))
        os.rmdir(trash)
        os.rename(out, trash)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(trash, out)
            raise
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.unlink(trash)
    else:
        os.rename(tmp, out)

"""Shared machinery of the tools: paths, progress, memory-bounded checkpoint I/O, ΔW algebra, SVD.

Nothing here knows a file-key string (that stays in ``lyco.formats``); everything works on
canonical names, :class:`~lyco.adapter.ModuleAdapter` objects and plain tensors.

* :func:`check_output` — the output rules every verb follows (never an input, ``--overwrite``).
* :class:`TensorReader` / :class:`StreamWriter` — read one tensor of a safetensors file with plain
  ``readinto`` (no memory map, so the resident memory is the tensor and nothing else) and write a
  safetensors file whose header is known up front, tensor after tensor, atomically.
* :func:`open_base` — a checkpoint, its module trees on the meta device (names, shapes, layer
  kinds; no weights) and a reader.
* :func:`weight_shape` — the shape of the weight an adapter module targets, from its tensors, a
  base model, or the SD naming rules.
* :func:`lora_factors` / :func:`dense_delta` — a module's ΔW as exact low-rank factors
  (LoRA, Tucker LoCon, LoHa via Khatri–Rao, LoKr via Kronecker factors) or as a dense matrix.
* :func:`factored_svd` / :func:`dense_svd` — SVD of ``up @ down`` without forming it, and of a
  dense matrix (exact, or randomised with power iterations).
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..adapter import TEXT_COMPONENTS, Adapter, ModuleAdapter, split_name
from ..algorithms.base import LayerSpec, flat, rebuild_tucker
from ..errors import ConfigError, FormatError

# --------------------------------------------------------------------------------------
# Progress, printing
# --------------------------------------------------------------------------------------


def progress(iterable=None, *, total=None, desc=None, enabled=True, unit="it"):
    """A tqdm bar on stderr (hidden when not a terminal, or when ``enabled`` is false)."""
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None if enabled else True,
                leave=False, dynamic_ncols=True, file=sys.stderr)


_LIBC = None


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere). The tools
    allocate and free tensors of many sizes one after the other; without this glibc keeps the
    fragments and the resident size creeps up to several times what is alive."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            import ctypes.util
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def say(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stderr)


def save_result(res, out, dtype, overwrite: bool, verbose: bool):
    """Write a tool's ``res.adapter`` to ``out`` (if any), record it in ``res.output`` and say so."""
    if out is not None:
        res.adapter.save(out, dtype=dtype, overwrite=overwrite)
        res.output = str(out)
        say(f"wrote {out}", verbose)
    return res


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------


def _real(p) -> Path:
    return Path(os.path.realpath(os.path.abspath(str(p))))


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return child != parent
    except ValueError:
        return False


def check_output(out, inputs: Iterable, *, overwrite: bool = False) -> Path:
    """Refuse an output that is (or contains, or lies inside a folder of) an input, and an existing
    output without ``overwrite``. Returns the output as an absolute path."""
    if out is None or str(out) == "":
        raise ConfigError("no output path given (-o OUT)")
    o = _real(out)
    for i in inputs:
        if i is None:
            continue
        r = _real(i)
        if o == r or (os.path.exists(o) and os.path.exists(r) and os.path.samefile(o, r)):
            raise ConfigError(f"output {out} is the input {i}; inputs are never modified, choose another path")
        if _inside(r, o):
            raise ConfigError(f"output {out} contains the input {i}; choose another path")
        if Path(r).is_dir() and _inside(o, r):
            raise ConfigError(f"output {out} is inside the input folder {i}; choose another path")
    if os.path.lexists(o) and not overwrite:
        raise ConfigError(f"output {out} already exists; pass --overwrite (overwrite=True) to replace it")
    if not o.parent.is_dir():
        raise ConfigError(f"output folder {o.parent} does not exist")
    return Path(os.path.abspath(str(out)))


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_weighted(spec: str, n_weights: int = 2) -> tuple[str, list[float]]:
    """``path[:w[:w2]]`` → (path, [weights]). Weights are peeled off the right only when they parse
    as numbers and the full string is not itself an existing path (paths may contain colons)."""
    s = str(spec)
    if os.path.exists(s):
        return s, []
    parts = s.split(":")
    weights: list[float] = []
    while len(parts) > 1 and len(weights) < n_weights and _FLOAT_RE.match(parts[-1].strip()):
        weights.insert(0, float(parts.pop()))
        if os.path.exists(":".join(parts)):
            break
    return ":".join(parts), weights


def load_adapter(x) -> Adapter:
    if isinstance(x, Adapter):
        return x
    from .. import load
    return load(str(x))


def parse_dtype(dtype) -> torch.dtype | None:
    from ..formats.kohya import parse_dtype as _p
    return _p(dtype)


# --------------------------------------------------------------------------------------
# Memory-bounded safetensors reading and writing
# --------------------------------------------------------------------------------------


class TensorReader:
    """One safetensors file read tensor by tensor with ``readinto`` (no mmap): the memory used is
    the tensor being read. ``rows`` reads a dim-0 slice without reading the rest."""

    def __init__(self, path):
        from ..formats.safetensors_io import DTYPES, read_header
        self.path = str(path)
        self.header = read_header(self.path)
        self._dtypes = DTYPES
        self._f = open(self.path, "rb", buffering=0)

    def info(self, key):
        try:
            return self.header.tensors[key]
        except KeyError:
            raise FormatError("no such tensor", file=self.path, key=key) from None

    def dtype(self, key) -> torch.dtype:
        code = self.info(key).dtype
        dt = self._dtypes[code][1]
        if dt is None:
            raise FormatError(f"dtype {code} is not supported by this torch", file=self.path, key=key)
        return dt

    def _read_bytes(self, offset: int, n: int) -> torch.Tensor:
        buf = torch.empty(n, dtype=torch.uint8)
        if n:
            mv = memoryview(buf.numpy())
            self._f.seek(offset)
            got = 0
            while got < n:
                k = self._f.readinto(mv[got:])
                if not k:
                    raise FormatError(f"file ends early (read {got} of {n} bytes at {offset})", file=self.path)
                got += k
        return buf

    def read(self, key, rows: tuple[int, int] | None = None) -> torch.Tensor:
        info = self.info(key)
        dt = self.dtype(key)
        shape = list(info.shape)
        start, n = self.header.data_start + info.start, info.nbytes
        if rows is not None:
            a, b = rows
            row_bytes = (n // shape[0]) if shape and shape[0] else 0
            start += a * row_bytes
            n = (b - a) * row_bytes
            shape[0] = b - a
        buf = self._read_bytes(start, n)
        if dt == torch.bool:
            return buf.view(torch.bool).reshape(shape)
        return buf.view(dt).reshape(shape) if n else torch.empty(shape, dtype=dt)

    def copy_raw(self, key, out) -> int:
        """Copy a tensor's bytes to the binary file ``out`` at its position (in the kernel with
        ``copy_file_range`` where the platform allows, else in 16 MiB chunks); returns the count."""
        info = self.info(key)
        off, left = self.header.data_start + info.start, info.nbytes
        if left and hasattr(os, "copy_file_range"):
            out.flush()
            pos = out.tell()
            try:
                while left:
                    n = os.copy_file_range(self._f.fileno(), out.fileno(), left, off, pos)
                    if n <= 0:
                        break
                    off, pos, left = off + n, pos + n, left - n
            except OSError:
                pass  # not supported here (or across these file systems): copy the rest by hand
            out.seek(pos)
        chunk = 16 << 20
        while left:
            n = min(chunk, left)
            b = self._read_bytes(off, n)
            out.write(memoryview(b.numpy()))
            off += n
            left -= n
        return info.nbytes

    def close(self):
        f, self._f = self._f, None
        if f is not None:
            f.close()


_ST_CODE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
            torch.uint8: "U8", torch.bool: "BOOL"}
for _n, _a in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
               ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _a):
        _ST_CODE[getattr(torch, _a)] = _n


def st_code(dtype: torch.dtype) -> str:
    if dtype not in _ST_CODE:
        raise FormatError(f"dtype {dtype} has no safetensors code")
    return _ST_CODE[dtype]


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class StreamWriter:
    """A safetensors file written tensor after tensor, its header known in advance.

    ``entries``: ``[(key, dtype, shape), …]`` in the order the tensors will be written. Used as a
    context manager; the file appears at ``path`` (atomically) only when every tensor was written.
    """

    def __init__(self, path, entries, metadata: Mapping[str, str] | None = None, *, overwrite: bool = False):
        import json
        self.path = str(path)
        self.overwrite = overwrite
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        off = 0
        self._order = []
        for key, dtype, shape in entries:
            n = math.prod(shape) * _element_size(dtype)
            if key in header:
                raise FormatError("duplicate tensor key", file=self.path, key=key)
            header[key] = {"dtype": st_code(dtype), "shape": list(shape), "data_offsets": [off, off + n]}
            self._order.append((key, n, dtype, tuple(shape)))
            off += n
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._head = raw
        self._i = 0

    def __enter__(self):
        import struct
        from ..formats.safetensors_io import atomic_write
        self._cm = atomic_write(self.path, overwrite=self.overwrite)
        self._f = self._cm.__enter__()
        self._f.write(struct.pack("<Q", len(self._head)))
        self._f.write(self._head)
        return self

    def _next(self, key):
        if self._i >= len(self._order):
            raise FormatError("more tensors written than announced", file=self.path, key=key)
        k, n, dt, shape = self._order[self._i]
        if k != key:
            raise FormatError(f"tensor written out of order (expected {k!r})", file=self.path, key=key)
        self._i += 1
        return n, dt, shape

    def write(self, key: str, t: torch.Tensor) -> None:
        n, dt, shape = self._next(key)
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype != dt or tuple(t.shape) != shape:
            raise FormatError(f"tensor is {t.dtype} {tuple(t.shape)}; announced {dt} {shape}",
                              file=self.path, key=key)
        t = t.contiguous()
        if n:
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

    def write_raw(self, key: str, reader: TensorReader, src_key: str) -> None:
        n, _, _ = self._next(key)
        got = reader.copy_raw(src_key, self._f)
        if got != n:
            raise FormatError(f"copied {got} bytes, expected {n}", file=self.path, key=key)

    def __exit__(self, et, ev, tb):
        if et is None and self._i != len(self._order):
            missing = self._order[self._i][0]
            err = FormatError(f"{len(self._order) - self._i} tensors were never written", file=self.path,
                              key=missing)
            self._cm.__exit__(type(err), err, None)
            raise err
        return self._cm.__exit__(et, ev, tb)


# --------------------------------------------------------------------------------------
# Base checkpoints: module trees on the meta device + lazy, memory-bounded reads
# --------------------------------------------------------------------------------------

ADAPTER_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_META_CACHE: dict[str, torch.nn.Module] = {}


def meta_module(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """A component built on the meta device from its config (names, layer kinds, shapes; no
    weights), cached per config: planning never modifies it."""
    import json
    from ..models.configs import build_from_config
    key = json.dumps(cfg, sort_keys=True, default=str)
    mod = _META_CACHE.get(key)
    if mod is None:
        if len(_META_CACHE) >= 8:
            _META_CACHE.pop(next(iter(_META_CACHE)))
        mod = _META_CACHE[key] = build_from_config(cfg, device="meta")
    return mod


class Base:
    """An opened checkpoint with meta-device module trees (``comps``) and canonical reads."""

    def __init__(self, path, family: str | None = None, components=ADAPTER_COMPONENTS):
        from ..formats.checkpoint import open_checkpoint
        self.path = str(path)
        self.ck = open_checkpoint(path, family)
        self.family = self.ck.family
        self.comps: dict[str, torch.nn.Module] = {}
        try:
            for c in components:
                cfg = self.ck.configs.get(c)
                if isinstance(cfg, Mapping) and any(n.startswith(c + ".") for n in self.ck.mapping):
                    self.comps[c] = meta_module(cfg)
        except Exception:
            self.ck.close()
            raise
        self._readers: dict[str, TensorReader] = {}

    def source_of(self, file_key: str) -> tuple[str, str, bool]:
        """A checkpoint file key → (the file holding it, its key there, whether that file is a
        safetensors file we can read piecewise)."""
        from ..formats.checkpoint import _SafetensorsSource
        i, inner = self.ck._index[file_key]
        src = self.ck._sources[i]
        return str(src.path), inner, isinstance(src, _SafetensorsSource)

    def reader(self, path: str) -> TensorReader:
        r = self._readers.get(path)
        if r is None:
            r = self._readers[path] = TensorReader(path)
        return r

    def read_file_key(self, file_key: str, rows=None) -> torch.Tensor:
        path, inner, piecewise = self.source_of(file_key)
        if not piecewise:  # legacy pickle: already in memory
            t = self.ck.get(file_key)
            return t[rows[0]:rows[1]] if rows is not None else t
        return self.reader(path).read(inner, rows)

    def has(self, name: str) -> bool:
        return name in self.ck.mapping

    def read(self, name: str) -> torch.Tensor:
        """A canonical tensor (e.g. ``unet.conv_in.weight``), read on its own."""
        ref = self.ck.ref(name)
        t = self.read_file_key(ref.key, ref.rows)
        return ref.to_canonical(t, sliced=True)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.ck.canonical_shape(name))

    def layers(self, components=None):
        """(canonical module name, LayerSpec) of every Linear/Conv layer of the components."""
        from ..algorithms.base import CONV_KINDS, LINEAR, layer_kind
        from ..naming import canonical_path
        for comp, root in self.comps.items():
            if components is not None and comp not in components:
                continue
            for path, mod in root.named_modules():
                kind = layer_kind(mod)
                if not path or kind not in (LINEAR, *CONV_KINDS):
                    continue
                yield f"{comp}.{canonical_path(comp, path, root)}", LayerSpec.from_module(mod)

    def plan(self, adapter: Adapter):
        """``plan_adapter`` against the meta trees: ([(canon, module, spec, ma)], unmatched names)."""
        from ..network import plan_adapter
        plan, unmatched = plan_adapter(adapter, self.comps)
        keep = []
        for canon, mod, spec, ma in plan:
            if canon + ".weight" in self.ck.mapping:
                keep.append((canon, mod, spec, ma))
            else:
                unmatched.append(canon)
        return keep, unmatched

    def close(self):
        for r in self._readers.values():
            r.close()
        self._readers = {}
        self.ck.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def check_family(adapter: Adapter, family: str | None, where: str | None = None) -> None:
    from ..errors import FamilyMismatch
    from ..formats.metadata import family_from_metadata
    fam = adapter.family or family_from_metadata(adapter.metadata)
    if fam and family and fam != family:
        raise FamilyMismatch(fam, family, file=adapter.source or where)


# --------------------------------------------------------------------------------------
# Weight shapes without a model
# --------------------------------------------------------------------------------------

# SD UNet k×k (3×3) convs, flattened names
_UNET_KXK = re.compile(r"(^|_)(conv_in|conv_out|resnets_\d+_conv[12]|downsamplers_0_conv|upsamplers_0_conv)$")
_UNET_1X1 = re.compile(r"(^|_)conv_shortcut$")
_UNET_PROJ = re.compile(r"(^|_)(proj_in|proj_out)$")


def spec_for(shape: tuple[int, ...]) -> LayerSpec:
    kind = {1: "layernorm", 2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}.get(len(shape))
    if kind is None:
        raise ConfigError(f"no layer kind for a weight of shape {shape}")
    if kind == "layernorm":
        return LayerSpec(kind, tuple(shape), normalized_shape=tuple(shape))
    return LayerSpec(kind, tuple(shape))


def _flat_shape(ma: ModuleAdapter) -> tuple[int, ...] | None:
    """(out, in·∏k) — or the full shape when the tensors carry it — from the tensors alone."""
    t = ma.tensors
    algo = ma.algo.lower().replace("_", "-")
    if algo in ("lora", "locon", "dylora"):
        from .. import algorithms
        return tuple(algorithms.get("lora").infer_weight_shape(t))
    if algo == "full":
        return tuple(t["diff"].shape)
    if algo == "norm":
        return tuple(t["w_norm"].shape)
    if algo == "loha":
        if "hada_t1" in t:
            return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1]) + tuple(t["hada_t1"].shape[2:])
        return (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1])
    if algo == "lokr":
        w1 = t.get("lokr_w1")
        o1, i1 = (w1.shape if w1 is not None else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]))
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
            return (o1 * w2.shape[0], i1 * w2.shape[1]) + tuple(w2.shape[2:])
        if "lokr_t2" in t:
            return (o1 * t["lokr_w2_a"].shape[1], i1 * t["lokr_w2_b"].shape[1]) + tuple(t["lokr_t2"].shape[2:])
        return (o1 * t["lokr_w2_a"].shape[0], i1 * t["lokr_w2_b"].shape[1])
    return None


def weight_shape(name: str, ma: ModuleAdapter, family: str | None = None,
                 base_specs: Mapping[str, LayerSpec] | None = None) -> tuple[int, ...]:
    """The full shape of the weight ``name`` adapts: from a base model when given, else from the
    tensors (LoRA/Full/Tucker forms carry it), else from the SD naming rules (UNet k×k convs are
    3×3, ``conv_shortcut`` is 1×1, ``proj_in/out`` are 1×1 convs in SD1 and Linear otherwise)."""
    if base_specs is not None and name in base_specs:
        return tuple(base_specs[name].weight_shape)
    shape = _flat_shape(ma)
    comp, path = split_name(name)
    if shape is None:
        raise ConfigError(f"module {name!r} ({ma.algo}): its ΔW depends on the base weight; pass the base "
                          f"model (--base MODEL)")
    if len(shape) != 2:
        return shape
    out, fin = shape
    # an explicit hint of the weight's rank
    ds = ma.tensors.get("dora_scale")
    ndim = ds.dim() if ds is not None and ds.dim() >= 2 else None
    f = path.replace(".", "_")
    if comp == "unet":
        if _UNET_KXK.search(f):
            if fin % 9:
                raise ConfigError(f"module {name!r}: {fin} input columns are not a 3×3 conv's; pass --base MODEL")
            return (out, fin // 9, 3, 3)
        if _UNET_1X1.search(f) or ndim == 4:
            return (out, fin, 1, 1)
        if _UNET_PROJ.search(f):
            if family == "sd1":
                return (out, fin, 1, 1)
            if family in ("sd2", "sdxl"):
                return (out, fin)
            raise ConfigError(f"module {name!r}: proj_in/proj_out is a 1×1 conv in SD1 and Linear in SD2/SDXL, "
                              f"and the adapter's model family is unknown; pass --base MODEL")
        return (out, fin)
    if comp in TEXT_COMPONENTS:
        return (out, fin)
    if ndim is not None and ndim != 2:
        raise ConfigError(f"module {name!r}: the kernel size of this conv is not stored in the file; "
                          f"pass --base MODEL")
    return (out, fin)


# --------------------------------------------------------------------------------------
# ΔW algebra
# --------------------------------------------------------------------------------------

WEIGHT_INDEPENDENT_LOWRANK = ("lora", "locon", "dylora", "loha", "lokr")


def _prep(ma: ModuleAdapter, dtype=torch.float32, device=None) -> tuple[Any, dict[str, torch.Tensor]]:
    alg = ma.algorithm
    t = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
         for k, v in ma.tensors.items()}
    inner = getattr(alg, "inner", alg)
    t = inner.export(t)  # folds ``scalar`` into a factor
    return alg, t


def is_dora(ma: ModuleAdapter) -> bool:
    return "dora_scale" in ma.tensors


def _kr_rows(a1, a2):
    """Row-wise Khatri–Rao: (o, r1), (o, r2) → (o, r1·r2) with [o, i·r2+j] = a1[o,i]·a2[o,j]."""
    return (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)


def _kr_cols(b1, b2):
    """Column-wise Khatri–Rao: (r1, c), (r2, c) → (r1·r2, c) with [i·r2+j, c] = b1[i,c]·b2[j,c]."""
    return (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])


def _tucker_to_lora(core, up_t, down_t):
    """Tucker ``R[p,q,s] = Σ_ij core[i,j,s]·up_t[i,p]·down_t[j,q]`` → (up (p, r), down (r, q·∏s))."""
    m = torch.einsum("ij...,jq->iq...", core, down_t)  # (r_i, q, *k)
    return up_t.t(), m.reshape(m.shape[0], -1)


def lora_factors(ma: ModuleAdapter, dtype=torch.float64, device=None):
    """Exact low-rank factors ``(up (out, R), down (R, in·∏k))`` with ``up @ down == ΔW`` (flattened,
    scale included) for LoRA/LoCon (Tucker too), LoHa (Khatri–Rao, rank r1·r2) and LoKr (Kronecker
    of the factors' own low-rank forms). None for DoRA and for algorithms without such a form."""
    algo = ma.algo.lower().replace("_", "-")
    if is_dora(ma) or algo not in WEIGHT_INDEPENDENT_LOWRANK:
        return None
    alg, t = _prep(ma, dtype, device)
    g = float(alg.scale(t))
    if algo in ("lora", "locon", "dylora"):
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        if "lora_mid.weight" in t:
            u, d = _tucker_to_lora(t["lora_mid.weight"], flat(up).t(), flat(down))
        else:
            u, d = flat(up), flat(down)
        return u * g, d
    if algo == "loha":
        a1, b1, a2, b2 = t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"]
        if "hada_t1" in t:
            t1, t2 = t["hada_t1"], t["hada_t2"]
            r1, r2 = t1.shape[0], t2.shape[0]
            k = tuple(t1.shape[2:])
            core = (t1[:, None, :, None] * t2[None, :, None, :]).reshape((r1 * r2, r1 * r2) + k)
            u, d = _tucker_to_lora(core, _kr_cols(a1, a2), _kr_cols(b1, b2))
        else:
            u, d = _kr_rows(a1, a2), _kr_cols(b1, b2)
        return u * g, d
    # LoKr: kron(A1 B1, A2 B2) = kron(A1, A2) · kron(B1, B2)
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
        a1, b1 = (w1, torch.eye(w1.shape[1], dtype=dtype, device=w1.device)) if w1.shape[1] <= w1.shape[0] \
            else (torch.eye(w1.shape[0], dtype=dtype, device=w1.device), w1)
    else:
        a1, b1 = t["lokr_w1_a"], t["lokr_w1_b"]
    if "lokr_w2" in t or "lokr_t2" in t:
        if "lokr_w2" in t:
            w2 = flat(t["lokr_w2"])
        else:
            w2 = flat(rebuild_tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]))
        a2, b2 = (w2, torch.eye(w2.shape[1], dtype=dtype, device=w2.device)) if w2.shape[1] <= w2.shape[0] \
            else (torch.eye(w2.shape[0], dtype=dtype, device=w2.device), w2)
    else:
        a2, b2 = t["lokr_w2_a"], flat(t["lokr_w2_b"])
    return torch.kron(a1, a2) * g, torch.kron(b1, b2)


def dense_delta(ma: ModuleAdapter, shape: tuple[int, ...], weight: torch.Tensor | None = None,
                dtype=torch.float32, device=None) -> torch.Tensor:
    """ΔW in the weight's layout (scale included), through the algorithm's own ``delta_weight``;
    ``weight`` (the base weight) is needed by OFT/IA3/GLoRA/DoRA. For a non-linear-in-m algorithm
    (BOFT) this is ``merged(m=1) − W``."""
    alg = ma.algorithm
    spec = spec_for(shape)
    t = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
         for k, v in ma.tensors.items()}
    w = weight.to(device=device, dtype=dtype) if weight is not None else None
    if not alg.weight_independent and w is None:
        raise ConfigError(f"{ma.algo}{' + DoRA' if is_dora(ma) else ''}: ΔW depends on the base weight; "
                          f"pass the base model (--base MODEL)")
    with torch.no_grad():
        if not getattr(alg, "linear_in_multiplier", True):
            w2, _ = alg.merged(t, spec, w, None, 1.0)
            return (w2 - w).reshape(shape)
        return alg.delta_weight(t, spec, w).reshape(shape)


# --------------------------------------------------------------------------------------
# SVD
# --------------------------------------------------------------------------------------


@dataclass
class SVD:
    U: torch.Tensor   # (m, k)
    S: torch.Tensor   # (k,)
    Vh: torch.Tensor  # (k, n)
    total2: float     # ‖A‖_F², for errors and energy rules
    complete: bool    # S holds the whole spectrum (exact SVD, or rank ≤ k)

    def tail2(self, r: int) -> float:
        """‖A − A_r‖_F² for the rank-r truncation (exact when U, V are exact singular vectors)."""
        kept = float((self.S[:r].double() ** 2).sum())
        return max(0.0, self.total2 - kept)


def factored_svd(up: torch.Tensor, down: torch.Tensor) -> SVD:
    """SVD of ``up @ down`` ((m, R) @ (R, n)) through two QRs and an R×R SVD, in float64:
    exact, and never forms the m×n product."""
    up, down = up.double(), down.double()
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.t())
    u, s, vh = torch.linalg.svd(ru @ rd.t())
    U = qu @ u
    Vh = vh @ qd.t()
    return SVD(U, s, Vh, float((s ** 2).sum()), True)


def sq_norm(a: torch.Tensor, chunk: int = 1 << 22) -> float:
    """‖a‖_F², a few million entries at a time (no full-size copy)."""
    f = a.reshape(-1)
    if f.dtype not in (torch.float32, torch.float64):
        f = f.float()
    tot = 0.0
    for i in range(0, f.numel(), chunk):
        c = f[i:i + chunk]
        tot += float((c * c).sum())  # torch's cascade summation: ~1e-8 relative in fp32
    return tot


def dense_svd(a: torch.Tensor, k: int | None = None, *, exact: bool = False, niter: int = 4,
              oversample: int = 10, generator_seed: int = 0) -> SVD:
    """Top-``k`` SVD of a 2-D matrix: exact (``torch.linalg.svd``) when asked, when ``k`` is None or
    when the matrix is small; otherwise randomised (Halko, Martinsson & Tropp): a Gaussian start of
    ``k + oversample`` vectors on the smaller side, ``niter`` subspace iterations with ``AᵀA`` (only
    the small side is orthonormalised), then the exact SVD of the projection through its
    float64 Gram matrix. Within rounding of the exact truncation when the spectrum decays, and
    within a fraction of a percent of it for a flat one."""
    m, n = a.shape
    mn = min(m, n)
    total2 = sq_norm(a)
    if exact or k is None or mn <= 128 or (k + oversample) * 3 >= mn:
        # small matrices in float64 on the CPU (cheap, and the reference for exactness)
        acc = a.double() if a.device.type == "cpu" and a.numel() <= (1 << 20) else a
        U, S, Vh = torch.linalg.svd(acc, full_matrices=False)
        return SVD(U.to(a.dtype), S.to(a.dtype), Vh.to(a.dtype), total2, True)
    flip = m < n
    x = a.t() if flip else a          # (big, small)
    q = min(mn, k + oversample)
    g = torch.Generator(device="cpu").manual_seed(generator_seed)
    z = torch.randn(x.shape[1], q, generator=g, dtype=torch.float32).to(device=a.device, dtype=a.dtype)
    for _ in range(niter):
        z, _ = torch.linalg.qr(z)
        z = x.t() @ (x @ z)
    z, _ = torch.linalg.qr(z)          # (small, q): orthonormal basis of the leading row space
    b = (x @ z).double()               # (big, q)
    evals, w = torch.linalg.eigh(b.t() @ b)
    order = torch.argsort(evals, descending=True)
    evals, w = evals[order].clamp_min(0), w[:, order]
    s = evals.sqrt()
    inv = torch.where(s > s[0] * 1e-12, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))
    u = (b @ w) * inv[None, :]         # (big, q)
    v = z.double() @ w                 # (small, q)
    if flip:
        u, v = v, u
    dt = a.dtype
    return SVD(u.to(dt), s.to(dt), v.t().to(dt).contiguous(), total2, q >= mn)


def residual_norm2(a: torch.Tensor, up: torch.Tensor, down: torch.Tensor, chunk_rows: int | None = None) -> float:
    """‖a − up @ down‖_F² in row blocks (never an a-sized temporary)."""
    m = a.shape[0]
    rows = chunk_rows or max(1, (1 << 22) // max(1, a.shape[1]))
    tot = 0.0
    up = up.to(a.dtype)
    down = down.to(a.dtype)
    for i in range(0, m, rows):
        d = a[i:i + rows] - up[i:i + rows] @ down
        tot += float((d * d).sum())
    return tot


def rel_error(a: torch.Tensor, approx: torch.Tensor) -> float:
    den = float(a.double().norm())
    if den == 0.0:
        return 0.0 if float(approx.double().norm()) == 0.0 else float("inf")
    return float((a.double() - approx.double()).norm()) / den


def lora_tensors(up2d: torch.Tensor, down2d: torch.Tensor, shape: tuple[int, ...], alpha: float,
                 dtype=torch.float32) -> dict[str, torch.Tensor]:
    """LoRA file tensors for a weight of ``shape``: up (out, r[,1,1…]), down (r, in[, *k])."""
    r = down2d.shape[0]
    if len(shape) > 2:
        up = up2d.reshape((shape[0], r) + (1,) * (len(shape) - 2))
        down = down2d.reshape((r,) + tuple(shape[1:]))
    else:
        up, down = up2d, down2d
    return {"lora_down.weight": down.to(dtype).contiguous(), "lora_up.weight": up.to(dtype).contiguous(),
            "alpha": torch.tensor(float(alpha), dtype=torch.float32)}


def split_factors(svd: SVD, r: int, scale: float = 1.0):
    """Truncate to rank r: (up = U·S/scale, down = Vh) so that scale·up@down is the truncation."""
    return svd.U[:, :r] * (svd.S[:r] / scale)[None, :], svd.Vh[:r]


def lowrank_error_report(errors: Mapping[str, float]) -> str:
    if not errors:
        return "no module approximated"
    vals = sorted(errors.values())
    mean = sum(vals) / len(vals)
    worst = max(errors.items(), key=lambda kv: kv[1])
    return (f"relative Frobenius error per module: mean {mean:.3g}, median {vals[len(vals) // 2]:.3g}, "
            f"max {worst[1]:.3g} ({worst[0]})")


def errors_json(errors: Mapping[str, float]) -> str:
    import json
    return json.dumps({k: (round(v, 7) if math.isfinite(v) else str(v)) for k, v in errors.items()},
                      sort_keys=True)




class BaseLookup:
    """Weight shapes and base weights for adapter modules, from a base checkpoint (``--base``)."""

    def __init__(self, path):
        self.base = Base(path)
        self.specs: dict[str, LayerSpec] = {}
        self._canon: dict[str, str] = {}

    def add(self, adapter: Adapter) -> list[str]:
        """Plan ``adapter`` on the base; returns its unmatched module names."""
        check_family(adapter, self.base.family, where=self.base.path)
        names = {id(ma): n for n, ma in adapter.modules.items()}
        plan, unmatched = self.base.plan(adapter)
        for canon, _mod, spec, ma in plan:
            n = names[id(ma)]
            self.specs[n] = spec
            self._canon[n] = canon
        return unmatched

    def weight(self, name: str) -> torch.Tensor:
        if name not in self._canon:
            raise ConfigError(f"module {name!r} has no weight in the base model {self.base.path}")
        return self.base.read(self._canon[name] + ".weight")

    def close(self):
        self.base.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def adapter_dtype(adapter: Adapter) -> torch.dtype:
    """The most common floating dtype of an adapter's tensors (alpha left out)."""
    counts: dict[torch.dtype, int] = {}
    for m in adapter.modules.values():
        for k, v in m.tensors.items():
            if k != "alpha" and v.is_floating_point():
                counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def is_kxk(shape) -> bool:
    return len(shape) > 2 and any(k != 1 for k in shape[2:])


def set_meta_pairs(pairs) -> dict[str, str]:
    """``["k=v", …]`` (or a mapping) → dict; a bare ``k=`` sets the empty string."""
    if pairs is None:
        return {}
    if isinstance(pairs, Mapping):
        return {str(k): str(v) for k, v in pairs.items()}
    out = {}
    for p in pairs:
        k, eq, v = str(p).partition("=")
        if not eq or not k:
            raise ConfigError(f"--set-meta expects KEY=VALUE, got {p!r}")
        out[k] = v
    return out


def numerical_rank(S: torch.Tensor, shape) -> int:
    """numpy's matrix_rank tolerance: σ > σ_max · max(m, n) · eps(float32)."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    tol = float(S[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((S > tol).sum())


def strip_dora(ma: ModuleAdapter) -> ModuleAdapter:
    return ModuleAdapter(ma.algo, {k: v for k, v in ma.tensors.items() if k != "dora_scale"})


def to_lora(name: str, ma: ModuleAdapter, shape: tuple[int, ...], rank: int | None, *,
            weight: torch.Tensor | None = None):
    """One module as LoRA tensors: ``(tensors, relative error, new rank)``.

    Exact (error 0) when the module has a low-rank form and ``rank`` is None or not below its rank;
    otherwise the best rank-``rank`` approximation by SVD (``rank`` None on a dense ΔW = its numerical
    rank). DoRA's ``dora_scale`` is kept on top of the converted inner module. ``weight`` (the base
    weight) is needed by weight-dependent algorithms (IA3, OFT, GLoRA), whose ΔW(W) at multiplier 1
    is used: the LoRA is then exact on that base model only (and, for BOFT, at multiplier 1 only)."""
    dora = ma.tensors.get("dora_scale")
    inner = strip_dora(ma) if dora is not None else ma
    fac = lora_factors(inner)
    mn = min(shape[0], math.prod(shape[1:]))
    if fac is not None:
        up, down = fac
        R = up.shape[1]
        if (rank is None or rank >= R) and R <= mn:
            t = lora_tensors(up, down, shape, float(R))
            err, r = 0.0, R
        else:
            svd = factored_svd(up, down)
            r = max(1, min(rank or mn, R, mn))
            u, d = split_factors(svd, r)
            t = lora_tensors(u, d, shape, float(r))
            err = math.sqrt(svd.tail2(r) / svd.total2) if svd.total2 else 0.0
            if rank is None:
                err = 0.0 if err < 1e-12 else err
    else:
        # a weight-independent inner part (Full) keeps its dora_scale on top; a weight-dependent one
        # (GLoRA + DoRA) goes in whole: the LoRA then carries the module's entire ΔW(W)
        target = inner if (dora is not None and inner.algorithm.weight_independent) else ma
        if not target.algorithm.weight_independent and weight is None:
            raise ConfigError(f"module {name!r} ({ma.algo}{' + DoRA' if dora is not None else ''}): its ΔW depends "
                              f"on the base weight; pass the base model (--base MODEL)")
        dw = dense_delta(target, shape, weight, dtype=torch.float64).reshape(shape[0], -1)
        svd = dense_svd(dw, None, exact=True)
        r = max(1, min(rank, mn)) if rank else max(1, numerical_rank(svd.S, dw.shape))
        u, d = split_factors(svd, r)
        t = lora_tensors(u, d, shape, float(r))
        err = math.sqrt(svd.tail2(r) / svd.total2) if svd.total2 else 0.0
        if target is ma:
            dora = None  # the whole (DoRA) delta is in the LoRA now
    if dora is not None:
        t["dora_scale"] = dora
    return t, err, r

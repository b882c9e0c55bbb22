"""Reading and writing tensor files: safetensors (checked before it is trusted) and legacy pickles.

Every adapter file goes through here, so the rules live in one place:

* :func:`read_header` parses the safetensors header itself (8-byte little-endian length, then a
  JSON object) and checks it before any tensor is touched: sizes, dtypes, shapes, offsets inside
  the data section, no overlap, no gap. A bad file raises :class:`~lyco.errors.FormatError`
  naming the file, never a raw ``json``/``struct``/``safetensors`` exception.
* :func:`load_tensors` = :func:`read_header` + the safetensors reader.
* :func:`save_tensors` / :func:`atomic_write`: outputs are written to a temporary file in the
  same folder, flushed and fsynced, then moved into place; an existing file is never replaced
  unless ``overwrite=True``, and a failed write leaves nothing behind.
* :func:`load_legacy`: ``.pt``/``.ckpt``/``.bin`` through ``torch.load(weights_only=True)`` only;
  a pickle that would need code execution raises :class:`~lyco.errors.UnsafeFile`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Mapping

import torch

from ..errors import FormatError, LycoError, UnsafeFile, WriteError

MAX_HEADER = 100 * 1024 * 1024  # 100 MiB, the limit the safetensors library uses too
MAX_NDIM = 16
#: more tensors than any real adapter or checkpoint has (an SDXL LyCORIS file with every layer and
#: algorithm holds ~15k; an SDXL single file ~2.5k): a header listing more is refused before parsing
MAX_TENSORS = 50_000
#: JSON separators (commas) a header may hold: bounds the objects a 100 MiB header could make
#: (parsing 1M small entries costs ~0.5 GB; metadata such as ss_tag_frequency stays far below)
MAX_JSON_ITEMS = 1_000_000

#: safetensors dtype string -> (bytes per element, torch dtype or None when torch lacks it)
DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64),
    "I32": (4, torch.int32),
    "I16": (2, torch.int16),
    "I8": (1, torch.int8),
    "U8": (1, torch.uint8),
    "U16": (2, getattr(torch, "uint16", None)),
    "U32": (4, getattr(torch, "uint32", None)),
    "U64": (8, getattr(torch, "uint64", None)),
    "BOOL": (1, torch.bool),
    "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)),
    "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)),
}

LEGACY_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
#: errors of a write that mean the output could not be written (no space, quota, file too large)
_FULL_ERRNOS = {__import__("errno").ENOSPC, __import__("errno").EDQUOT, __import__("errno").EFBIG}


# --------------------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # offsets relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Header:
    """A validated safetensors header."""

    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    header_len: int = 0      # the n of the 8-byte prefix
    file_size: int = 0

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_start


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_header_bytes(prefix: bytes, file_size: int, *, file: str | None = None,
                       max_header: int = MAX_HEADER) -> Header:
    """Validate a safetensors header given its first ``8 + n`` bytes and the total file size."""
    if file_size < 8 or len(prefix) < 8:
        raise FormatError(f"file is truncated: {file_size} bytes, a safetensors file starts with an "
                          f"8-byte header length", file=file)
    (n,) = struct.unpack("<Q", prefix[:8])
    if n == 0:
        raise FormatError("header length is 0; expected a JSON header", file=file)
    if n > max_header:
        raise FormatError(f"header length {n} exceeds the limit of {max_header} bytes "
                          f"(not a safetensors file, or a hostile one)", file=file)
    if 8 + n > file_size:
        raise FormatError(f"header length {n} runs past the end of the file ({file_size} bytes): "
                          f"the file is truncated or not a safetensors file", file=file)
    raw = prefix[8:8 + n]
    if len(raw) < n:
        raise FormatError(f"could read only {len(raw)} of the {n} header bytes", file=file)
    # bound the work and memory of parsing before parsing (a 100 MiB header of tiny entries would
    # otherwise build tens of millions of Python objects). ``"data_offsets"`` cannot occur inside a
    # JSON string (its quotes would be escaped), so this counts tensor entries from above.
    n_tensors = raw.count(b'"data_offsets"')
    if n_tensors > MAX_TENSORS:
        raise FormatError(f"header lists {n_tensors} tensors, more than the limit of {MAX_TENSORS} "
                          f"(not an adapter or checkpoint, or a hostile file)", file=file)
    n_items = raw.count(b",")
    if n_items > MAX_JSON_ITEMS:
        raise FormatError(f"header has {n_items} JSON entries, more than the limit of {MAX_JSON_ITEMS} "
                          f"(a hostile or broken file)", file=file)
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"header is not valid UTF-8 JSON ({e})", file=file) from None
    except RecursionError:
        raise FormatError("header JSON is nested too deeply", file=file) from None
    if not isinstance(obj, dict):
        raise FormatError(f"header is a JSON {type(obj).__name__}; expected an object", file=file)
    if len(obj) > MAX_TENSORS + 1:
        raise FormatError(f"header lists {len(obj) - 1} tensors, more than the limit of {MAX_TENSORS}", file=file)

    data_size = file_size - 8 - n
    meta_raw = obj.pop("__metadata__", None)
    metadata: dict[str, str] = {}
    if meta_raw is not None:
        if not isinstance(meta_raw, dict):
            raise FormatError("'__metadata__' is not a JSON object of strings", file=file, key="__metadata__")
        for k, v in meta_raw.items():
            if not isinstance(v, str):
                raise FormatError(f"metadata value is a JSON {type(v).__name__}; expected a string",
                                  file=file, key=k)
            metadata[k] = v

    tensors: dict[str, TensorInfo] = {}
    for name, info in obj.items():
        if not isinstance(info, dict):
            raise FormatError("tensor entry is not a JSON object", file=file, key=name)
        extra = set(info) - {"dtype", "shape", "data_offsets"}
        missing = {"dtype", "shape", "data_offsets"} - set(info)
        if missing or extra:
            raise FormatError(f"tensor entry has fields {sorted(info)}; expected dtype, shape, data_offsets",
                              file=file, key=name)
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise FormatError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}",
                              file=file, key=name)
        if DTYPES[dtype][1] is None:
            raise FormatError(f"dtype {dtype} is not supported by this torch build", file=file, key=name)
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) for d in shape):
            raise FormatError(f"shape {shape!r} is not a list of at most {MAX_NDIM} integers",
                              file=file, key=name)
        if any(d < 0 for d in shape):
            raise FormatError(f"shape {shape} has a negative dimension", file=file, key=name)
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)):
            raise FormatError(f"data_offsets {offs!r} is not a pair of integers", file=file, key=name)
        start, end = offs
        if not (0 <= start <= end):
            raise FormatError(f"data_offsets {offs} are not 0 <= begin <= end", file=file, key=name)
        if end > data_size:
            raise FormatError(f"data_offsets {offs} run past the data section ({data_size} bytes)",
                              file=file, key=name)
        nbytes = math.prod(shape) * DTYPES[dtype][0]  # Python ints: no overflow
        if nbytes != end - start:
            raise FormatError(f"shape {shape} x {dtype} needs {nbytes} bytes, but data_offsets {offs} span "
                              f"{end - start}", file=file, key=name)
        tensors[name] = TensorInfo(dtype, tuple(shape), start, end)

    # The tensors must tile the data section: no overlap (two names sharing bytes) and no gap.
    pos, prev = 0, None
    for name, ti in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if ti.start < pos:
            raise FormatError(f"data of tensor {name!r} [{ti.start}, {ti.end}) overlaps tensor {prev!r} "
                              f"(ends at {pos})", file=file, key=name)
        if ti.start > pos:
            raise FormatError(f"{ti.start - pos} unused bytes before tensor {name!r} at offset {pos} of the "
                              f"data section", file=file, key=name)
        pos, prev = ti.end, name
    if pos != data_size:
        raise FormatError(f"data section is {data_size} bytes but the tensors cover {pos}: "
                          f"{'trailing bytes' if pos < data_size else 'truncated'}", file=file)
    return Header(tensors, metadata, n, file_size)


def read_header(path, max_header: int = MAX_HEADER) -> Header:
    """Read and validate the header of a safetensors file (no tensor data is read)."""
    p = str(path)
    try:
        size = os.path.getsize(p)
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if 0 < n <= max_header and 8 + n <= size:
                    head += f.read(n)
    except IsADirectoryError:
        raise FormatError("is a directory; expected a .safetensors file", file=p) from None
    except FileNotFoundError:
        raise FormatError("no such file", file=p) from None
    except OSError as e:
        raise FormatError(f"cannot read the file ({e.strerror or e})", file=p) from None
    return parse_header_bytes(head, size, file=p, max_header=max_header)


def read_metadata(path) -> dict[str, str]:
    """Only the ``__metadata__`` of a safetensors file (validated header)."""
    return read_header(path).metadata


def load_tensors(path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, after :func:`read_header` accepted it."""
    header = read_header(path)
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as e:  # the header was checked; anything left is an I/O or library error
        raise FormatError(f"safetensors could not read the tensors ({type(e).__name__}: {e})",
                          file=str(path)) from None
    if set(tensors) != set(header.tensors):
        raise FormatError("the tensors read differ from the header's list", file=str(path))
    return tensors, dict(header.metadata)


# --------------------------------------------------------------------------------------
# Legacy pickles
# --------------------------------------------------------------------------------------


def load_legacy(path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pt``/``.ckpt``/``.bin`` file, loaded with ``weights_only=True`` only.

    A top-level ``state_dict`` entry (Lightning/LDM checkpoints) is unwrapped; non-tensor values
    (step counters, nested dicts) are left out. Pickles carry no metadata (see :func:`load`).
    ``mmap``: map the tensors of a zip-format file (torch ≥ 1.6) instead of reading them, for
    multi-GB base checkpoints (copy-on-write: the file is never written).
    """
    p = str(path)
    if not os.path.isfile(p):
        raise FormatError("no such file", file=p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(p))
    except pickle.UnpicklingError as e:
        inner = str(e.__context__ if isinstance(e.__context__, pickle.UnpicklingError) else e).strip()
        first = inner.splitlines()[0] if inner else type(e).__name__
        low = inner.lower()
        if "global" in low or "reduce" in low or "class" in low:
            raise UnsafeFile(
                f"{p}: refusing to load this pickle: it references code ({first}), and loading it would "
                f"need code execution (torch.load weights_only=True refused). Convert it to .safetensors "
                f"with a tool you trust, or re-save it as a plain dict of tensors.") from None
        raise FormatError(f"not a readable torch pickle ({first})", file=p) from None
    except Exception as e:
        raise FormatError(f"not a readable torch file ({type(e).__name__}: {e})", file=p) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise FormatError(f"contains a {type(obj).__name__}; expected a dict of tensors", file=p)
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors and obj:
        raise FormatError("contains no tensors at its top level", file=p)
    return tensors


def load(path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`load_tensors` for ``.safetensors``, :func:`load_legacy` for the pickle suffixes."""
    suffix = Path(str(path)).suffix.lower()
    if suffix in LEGACY_SUFFIXES:
        tensors = load_legacy(path)
        if str(device) != "cpu":
            tensors = {k: v.to(device) for k, v in tensors.items()}
        return tensors, {}
    return load_tensors(path, device)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, *, overwrite: bool = False) -> Iterator[IO[bytes]]:
    """Write ``path`` all at once: yields a binary file open on a temporary file in the same folder.

    On normal exit the data is flushed and fsynced and the temporary file takes the final name
    (``os.replace``, or a hard link when ``overwrite`` is false so a file created meanwhile is not
    clobbered either). On an exception the temporary file is removed and any old file is untouched.
    """
    final = os.path.abspath(str(path))
    folder = os.path.dirname(final) or "."
    if os.path.isdir(final):
        raise LycoError(f"{final}: is a directory; expected a file path to write")
    if os.path.lexists(final) and not overwrite:
        raise LycoError(f"{final}: already exists; refusing to overwrite it (pass overwrite=True, "
                        f"or --overwrite on the command line)")
    if not os.path.isdir(folder):
        raise LycoError(f"{final}: the folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(final) + ".", suffix=".tmp", dir=folder)
    except OSError as e:
        raise WriteError(final, e, "cannot create a file in the output folder") from None
    os.close(fd)
    try:
        with open(tmp, "wb") as f:  # opened by name so that f.name is the temporary path
            try:
                yield f
            except OSError as e:
                # a write of the caller's that failed for want of space is a failure to write the
                # output; other OSErrors of the body (e.g. reading an input) pass through unchanged
                if getattr(e, "errno", None) in _FULL_ERRNOS and not isinstance(e, LycoError):
                    raise WriteError(final, e) from None
                raise
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise WriteError(final, e) from None
        try:
            os.chmod(tmp, 0o666 & ~_current_umask())
        except OSError as e:
            raise WriteError(final, e) from None
        try:
            if overwrite:
                os.replace(tmp, final)
            else:
                try:
                    os.link(tmp, final)  # fails if the name appeared meanwhile
                except FileExistsError:
                    raise LycoError(f"{final}: was created by someone else while writing; not overwritten") from None
                except OSError:  # file systems without hard links
                    if os.path.lexists(final):
                        raise LycoError(f"{final}: already exists; refusing to overwrite it") from None
                    os.replace(tmp, final)
                else:
                    os.unlink(tmp)
        except LycoError:
            raise
        except OSError as e:
            raise WriteError(final, e, "cannot move the finished file into place") from None
        _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _prepare_tensors(tensors: Mapping[str, torch.Tensor], file: str | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        if not isinstance(k, str):
            raise FormatError(f"tensor name {k!r} is not a string", file=file)
        if k == "__metadata__":
            raise FormatError("'__metadata__' cannot be a tensor name", file=file)
        if not isinstance(v, torch.Tensor):
            raise FormatError(f"value is a {type(v).__name__}; expected a torch.Tensor", file=file, key=k)
        t = v.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.numel():
            # safetensors refuses tensors that share memory: give views and repeats their own copy
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _check_metadata(metadata: Mapping[str, str] | None, file: str | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    out = {}
    for k, v in metadata.items():
        if not isinstance(k, str):
            raise FormatError(f"metadata key {k!r} is not a string", file=file)
        if not isinstance(v, str):
            raise FormatError(f"metadata value is a {type(v).__name__} ({v!r:.60}); safetensors metadata "
                              f"values must be strings (use str() or json.dumps())", file=file, key=k)
        out[k] = v
    return out


def serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors bytes of ``tensors`` + ``metadata`` (in memory)."""
    from safetensors.torch import save
    return save(_prepare_tensors(tensors, None), _check_metadata(metadata, None))


def save_tensors(tensors: Mapping[str, torch.Tensor], path, metadata: Mapping[str, str] | None = None,
                 overwrite: bool = False) -> None:
    """Write a safetensors file atomically. Metadata values must be ``str``."""
    p = str(path)
    prepared = _prepare_tensors(tensors, p)
    meta = _check_metadata(metadata, p)
    from safetensors.torch import save
    try:
        data = save(prepared, meta)
    except Exception as e:
        raise FormatError(f"safetensors could not serialise the tensors ({type(e).__name__}: {e})",
                          file=p) from None
    with atomic_write(p, overwrite=overwrite) as f:
        f.write(data)

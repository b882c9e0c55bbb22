"""A1111-style adapter tags in prompts, and finding the files they name.

Syntax (as in the AUTOMATIC1111 webui's built-in Lora extension)::

    <lora:NAME>                      te = unet = 1.0
    <lora:NAME:TE>                   unet defaults to the TE weight
    <lora:NAME:TE:UNET>
    <lora:NAME:TE:UNET:DYN>          DYN: keep only the first DYN ranks of LoRA modules
    <lora:NAME:unet=0.6:te=0.3>      named weights (``te=``, ``unet=``, ``dyn=``), in any order,
    <lora:NAME:0.8:dyn=8>            mixed with positional ones
    <lyco:…>                         the same (the LyCORIS extension's alias)

``NAME`` is a file stem (``my_style`` for ``my_style.safetensors``) or the file's alias
(``ss_output_name`` in its header), looked up in adapter folders by :class:`AdapterIndex`.

:func:`parse` removes the tags from the prompt and tidies the whitespace and commas they leave
behind; everything else — attention weights ``(word:1.2)``, nested parentheses, alternations
``[a|b]``, other ``<…>`` tags — is left exactly as written. This module has no torch dependency.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import ConfigError, LycoError

#: tag kinds handled here (A1111 registers ``lyco`` as an alias of ``lora``)
TAG_KINDS = ("lora", "lyco")
#: adapter file suffixes a folder scan picks up
EXTENSIONS = (".safetensors", ".pt", ".ckpt")

_TAG = re.compile(r"<(lora|lyco):([^<>]*)>", re.IGNORECASE)
_NAMED_KEYS = ("te", "unet", "dyn")
_OPENERS = "([{"
_CLOSERS = ")]}"


class PromptError(ConfigError):
    """A malformed adapter tag."""


@dataclass(frozen=True)
class AdapterTag:
    """One ``<lora:…>``/``<lyco:…>`` tag: the name and the weights it asks for."""

    kind: str
    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    text: str = ""            # the tag as written
    start: int = 0            # its span in the original prompt
    end: int = 0

    def as_tag(self) -> str:
        """The tag written back in its shortest positional form."""
        parts = [self.name, _fmt(self.te)]
        if self.unet != self.te or self.dyn is not None:
            parts.append(_fmt(self.unet))
        if self.dyn is not None:
            parts.append(str(self.dyn))
        return f"<{self.kind}:{':'.join(parts)}>"


def _fmt(x: float) -> str:
    return f"{x:g}"


def _number(value: str, what: str, tag: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise PromptError(f"adapter tag {tag!r}: {what} must be a number, got {value.strip()!r}") from None
    if not math.isfinite(v):
        raise PromptError(f"adapter tag {tag!r}: {what} must be finite, got {value.strip()!r}")
    return v


def _dyn(value: str, tag: str) -> int | None:
    v = value.strip()
    if v.lower() in ("", "none"):
        return None
    try:
        d = int(v)
    except ValueError:
        f = _number(v, "dyn", tag)
        if f != int(f):
            raise PromptError(f"adapter tag {tag!r}: dyn must be a whole number of ranks, got {v!r}") from None
        d = int(f)
    if d < 1:
        raise PromptError(f"adapter tag {tag!r}: dyn must be at least 1, got {d}")
    return d


def parse_tag(kind: str, body: str, text: str = "", start: int = 0, end: int = 0) -> AdapterTag:
    """The :class:`AdapterTag` of the inside of one tag (``NAME:TE:UNET:DYN`` or named weights)."""
    text = text or f"<{kind}:{body}>"
    parts = body.split(":")
    name = parts[0].strip()
    if not name:
        raise PromptError(f"adapter tag {text!r}: no adapter name (write <{kind}:NAME:WEIGHT>)")
    positional: list[str] = []
    named: dict[str, str] = {}
    for p in parts[1:]:
        if "=" in p:
            k, _, v = p.partition("=")
            k = k.strip().lower()
            if k not in _NAMED_KEYS:
                raise PromptError(f"adapter tag {text!r}: unknown parameter {k!r}; use te=, unet= or dyn=")
            if k in named:
                raise PromptError(f"adapter tag {text!r}: {k}= given twice")
            named[k] = v
        else:
            positional.append(p)
    if len(positional) > 3:
        raise PromptError(f"adapter tag {text!r}: too many values; the form is "
                          f"<{kind}:NAME:TE[:UNET[:DYN]]>")
    for k, v in zip(_NAMED_KEYS, positional):
        named.setdefault(k, v)  # as in A1111: a named value wins over a positional one
    te = _number(named["te"], "te", text) if "te" in named and named["te"].strip() else 1.0
    unet = _number(named["unet"], "unet", text) if "unet" in named and named["unet"].strip() else te
    dyn = _dyn(named["dyn"], text) if "dyn" in named else None
    return AdapterTag(kind.lower(), name, te, unet, dyn, text, start, end)


def find_tags(prompt: str) -> list[AdapterTag]:
    """Every adapter tag of ``prompt``, in order (the prompt itself is not changed)."""
    return [parse_tag(m.group(1), m.group(2), m.group(0), m.start(), m.end()) for m in _TAG.finditer(prompt)]


def _join(left: str, right: str) -> str:
    """Join the text either side of a removed tag, tidying the gap like a person would."""
    l, r = left.rstrip(), right.lstrip()
    if not l:
        return r.lstrip(", ").lstrip() if r.startswith(",") else r
    if not r:
        return l.rstrip(",").rstrip() if l.endswith(",") else l
    if l.endswith(",") and r.startswith(","):
        r = r[1:].lstrip()
        if not r:
            return l.rstrip(",").rstrip()
    if l[-1] in _OPENERS or r[0] in _CLOSERS or r[0] in ",.;:|":
        return l + r
    return l + " " + r


def strip_tags(prompt: str, tags: Iterable[AdapterTag] | None = None) -> str:
    """``prompt`` without its adapter tags. Only the gaps the tags leave are tidied (spaces, a
    doubled or dangling comma); the rest of the prompt is returned exactly as written."""
    tags = find_tags(prompt) if tags is None else sorted(tags, key=lambda t: t.start)
    if not tags:
        return prompt
    out, pos = None, 0
    for t in tags:
        seg = prompt[pos:t.start]
        out = seg.rstrip() if out is None else _join(out, seg)
        pos = t.end
    return _join(out, prompt[pos:])


def parse(prompt: str) -> tuple[str, list[AdapterTag]]:
    """``(prompt without adapter tags, tags)``."""
    tags = find_tags(prompt)
    return strip_tags(prompt, tags), tags


# --------------------------------------------------------------------------------------
# Finding the files tags name
# --------------------------------------------------------------------------------------

#: (path, mtime_ns, size) → header metadata; headers only, never tensor data
_HEADER_CACHE: dict[tuple[str, int, int], dict[str, str]] = {}
#: (path, mtime_ns, size) → full sha256 of the tensor data (the A1111 "addnet" hash)
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _stat_key(path: str | os.PathLike) -> tuple[str, int, int]:
    p = os.path.abspath(str(path))
    st = os.stat(p)
    return p, st.st_mtime_ns, st.st_size


def read_header_metadata(path) -> dict[str, str]:
    """The safetensors header metadata of ``path`` (cached by path, mtime and size; ``{}`` for
    pickles and for unreadable headers — a bad file is reported when it is loaded)."""
    key = _stat_key(path)
    if key in _HEADER_CACHE:
        return _HEADER_CACHE[key]
    md: dict[str, str] = {}
    if str(path).lower().endswith(".safetensors"):
        from .formats.safetensors_io import read_metadata
        try:
            md = dict(read_metadata(path))
        except LycoError:
            md = {}
    _HEADER_CACHE[key] = md
    return md


def file_hash(path) -> str:
    """The full hash A1111 records for an adapter file: ``sshs_model_hash`` from the header when
    present, else the sha256 of the tensor data (after the header) of a safetensors file, else the
    sha256 of the whole file. Cached by path, mtime and size."""
    md = read_header_metadata(path)
    h = md.get("sshs_model_hash", "")
    if re.fullmatch(r"[0-9a-fA-F]{12,64}", h or ""):
        return h.lower()
    key = _stat_key(path)
    if key not in _HASH_CACHE:
        if str(path).lower().endswith(".safetensors"):
            from .formats.metadata import addnet_hash_of_file
            _HASH_CACHE[key] = addnet_hash_of_file(path)
        else:
            d = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    d.update(chunk)
            _HASH_CACHE[key] = d.hexdigest()
    return _HASH_CACHE[key]


def short_hash(path) -> str:
    """The 12-hex-digit short hash shown in A1111's ``Lora hashes`` infotext."""
    return file_hash(path)[:12]


def infotext_name(name: str) -> str:
    """A name as A1111 writes it in ``Lora hashes`` (no ``:`` or ``,``)."""
    return name.replace(":", "").replace(",", "")


@dataclass
class IndexedFile:
    path: Path
    stem: str
    alias: str | None

    @property
    def display_name(self) -> str:
        """A1111's preferred name: the alias from the file when it has one, else the stem."""
        return self.alias or self.stem


class AdapterIndex:
    """Adapter files in some folders (searched recursively, in order), by stem and by alias.

    The first folder wins when two files share a stem; an alias (``ss_output_name``) never hides
    a stem, and an alias shared by several files is not usable (the tag must use a stem).
    Only headers are read, and they are cached.
    """

    def __init__(self, folders: Iterable[str | os.PathLike] = ()):
        self.folders = [Path(f) for f in folders]
        for f in self.folders:
            if not f.is_dir():
                raise LycoError(f"{f}: adapter folder does not exist or is not a folder")
        self.files: list[IndexedFile] = []
        self.by_stem: dict[str, IndexedFile] = {}
        self.by_alias: dict[str, IndexedFile] = {}
        self.ambiguous_aliases: dict[str, list[Path]] = {}
        self.refresh()

    def refresh(self) -> None:
        self.files, self.by_stem, self.by_alias, self.ambiguous_aliases = [], {}, {}, {}
        seen: set[str] = set()
        for folder in self.folders:
            visited: set[str] = set()
            for root, dirs, names in os.walk(folder, followlinks=True):
                # symlinked folders are followed, but each real folder once (no loops)
                real_root = os.path.realpath(root)
                if real_root in visited:
                    dirs[:] = []
                    continue
                visited.add(real_root)
                dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) not in visited)
                for n in sorted(names):
                    if not n.lower().endswith(EXTENSIONS) or n.startswith("."):
                        continue
                    p = Path(root) / n
                    if not p.is_file():  # dangling link or not a regular file
                        continue
                    real = os.path.realpath(p)
                    if real in seen:
                        continue
                    seen.add(real)
                    try:
                        alias = read_header_metadata(p).get("ss_output_name", "").strip() or None
                    except OSError:
                        continue
                    f = IndexedFile(p, p.stem, alias)
                    self.files.append(f)
                    self.by_stem.setdefault(f.stem, f)
        aliases: dict[str, list[IndexedFile]] = {}
        for f in self.files:
            if f.alias and f.alias != f.stem:
                aliases.setdefault(f.alias, []).append(f)
        for a, fs in aliases.items():
            if a in self.by_stem:
                continue
            if len(fs) == 1:
                self.by_alias[a] = fs[0]
            else:
                self.ambiguous_aliases[a] = [f.path for f in fs]

    def names(self) -> list[str]:
        return sorted({*self.by_stem, *self.by_alias})

    def find(self, name: str) -> IndexedFile | None:
        f = self.by_stem.get(name) or self.by_alias.get(name)
        if f is not None:
            return f
        low = name.lower()
        hits = {id(g): g for n, g in [*self.by_stem.items(), *self.by_alias.items()] if n.lower() == low}
        return next(iter(hits.values())) if len(hits) == 1 else None

    def resolve(self, name: str) -> IndexedFile:
        """The file a tag's NAME means, or a :class:`LycoError` naming close matches."""
        f = self.find(name)
        if f is None:
            self.refresh()  # a file added since the last scan
            f = self.find(name)
        if f is not None:
            return f
        if name in self.ambiguous_aliases:
            paths = ", ".join(str(p) for p in self.ambiguous_aliases[name])
            raise LycoError(f"adapter {name!r}: several files have this alias (ss_output_name): {paths}; "
                            f"use a file name instead")
        where = ", ".join(str(f) for f in self.folders) or "(no adapter folder given; pass --adapter-dir)"
        close = difflib.get_close_matches(name, self.names(), n=5, cutoff=0.5)
        if not close:
            low = {n.lower(): n for n in self.names()}
            close = [low[c] for c in difflib.get_close_matches(name.lower(), list(low), n=5, cutoff=0.5)]
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise LycoError(f"no adapter named {name!r} in {where}{hint}")

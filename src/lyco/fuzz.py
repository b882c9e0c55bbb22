"""Seeded, bounded fuzzing of every reader lyco points at files from strangers.

    python -m lyco.fuzz --reader kohya --cases 100000            # one reader, long mode
    python -m lyco.fuzz --reader all --cases 2000 --json out.json
    python -m lyco.fuzz --list

Every case builds one hostile input (a file, a folder or a string) from ``(seed, case index)``
alone, so any failure is reproduced by ``--seed S --start I --cases 1``, and runs the reader on
it under a per-case time limit. The only acceptable outcomes are success or a
:class:`lyco.errors.LycoError` whose message is one clean, bounded text (no raw control/escape/bidi
characters, at most :data:`MAX_MESSAGE` characters). Anything else is recorded as a finding:

* ``crash:<Type>`` — another exception type escaped from inside the reader;
* ``hang`` — the case ran past the time limit;
* ``memory`` — the process's peak RSS grew by more than the allowed amount during the case;
* ``code-executed`` — a marker that a hostile pickle would create appeared;
* ``unsafe-message`` / ``unsafe-output`` — an error message or ``lyco inspect`` report carried raw
  terminal control characters, or was not length-limited.

Readers (see :data:`READERS`): ``safetensors`` (``read_header``/``load_tensors`` on raw and
header-level corruption), ``kohya`` (``lyco.load`` + ``inspect`` + attach to a tiny model, on
structure-aware mutations of valid files of every algorithm), ``peft``, ``legacy`` (``.pt``/``.ckpt``
pickles and zip archives through ``lyco.load`` and ``open_checkpoint``), ``checkpoint``
(``open_checkpoint`` + tensor reads on mutated tiny single files), ``preset`` (TOML presets through
``lyco.presets.get`` and ``lyco.create``), ``train_config`` (the trainer's TOML loader),
``dataset`` (the trainer's folder/caption/image scanner and image loader) and ``infotext``
(prompt tags and A1111 infotext parsing).

This module never unpickles anything itself: hostile pickles are *written* with ``pickle.dumps``
(which runs no foreign code) and only ever read through lyco's own readers, which must refuse them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import pickle
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import unicodedata
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MAX_MESSAGE = 4000          # characters an error message may have
DEFAULT_TIMEOUT = 10.0      # seconds per case
DEFAULT_RSS_GROWTH_MB = 1024

_UNSAFE_CATS = {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"}


def unsafe_chars(text: str, allow: str = "\n") -> list[str]:
    """Characters of ``text`` that would act on a terminal (control, escape, bidi, zero-width…)."""
    return [c for c in text if c not in allow and unicodedata.category(c) in _UNSAFE_CATS]


# ==============================================================================================
# Outcomes
# ==============================================================================================

@dataclass
class Finding:
    reader: str
    case: int
    seed: int
    outcome: str
    detail: str
    kind: str = ""
    repro: str | None = None


@dataclass
class Report:
    reader: str
    seed: int
    cases: int = 0
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def add(self, outcome: str, kind: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {"reader": self.reader, "seed": self.seed, "cases": self.cases, "seconds": round(self.seconds, 2),
                "outcomes": dict(sorted(self.outcomes.items())), "kinds": dict(sorted(self.kinds.items())),
                "findings": [f.__dict__ for f in self.findings[:50]], "num_findings": len(self.findings)}

    def summary(self) -> str:
        lines = [f"{self.reader}: {self.cases} cases in {self.seconds:.1f}s, "
                 f"{len(self.findings)} finding(s)"]
        for k, v in sorted(self.outcomes.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {v:7d}  {k}")
        seen = set()
        for f in self.findings:
            key = (f.outcome, f.detail.splitlines()[0][:120] if f.detail else "")
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"  FINDING case {f.case} [{f.kind}] {f.outcome}: {f.detail[:600]}")
        return "\n".join(lines)


class _Timeout(BaseException):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    if seconds <= 0 or not hasattr(signal, "setitimer") or \
            __import__("threading").current_thread() is not __import__("threading").main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def check_message(e: BaseException) -> str | None:
    """Why a LycoError's message is not acceptable, or None."""
    msg = str(e)
    if not msg.strip():
        return "empty message"
    if len(msg) > MAX_MESSAGE:
        return f"message of {len(msg)} characters (limit {MAX_MESSAGE})"
    bad = unsafe_chars(msg)
    if bad:
        return f"raw control characters {sorted({hex(ord(c)) for c in bad})[:6]} in the message: {msg[:300]!r}"
    return None


# ==============================================================================================
# Building blocks: safetensors bytes, TOML, pickles
# ==============================================================================================

ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass
class Entry:
    name: str
    dtype: str
    shape: list
    data: bytes


def st_bytes(entries: list[Entry], metadata: dict | None, *, header: dict | None = None,
             pad: bool = True) -> bytes:
    """A safetensors file of ``entries`` (data laid out in order); ``header`` replaces the JSON."""
    if header is None:
        header = {}
        if metadata is not None:
            header["__metadata__"] = metadata
        off = 0
        for e in entries:
            header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [off, off + len(e.data)]}
            off += len(e.data)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(e.data for e in entries)


def parse_st(blob: bytes) -> tuple[list[Entry], dict]:
    """Entries and metadata of a valid safetensors file (for building mutations)."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    entries = []
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = info["data_offsets"]
        entries.append(Entry(name, info["dtype"], list(info["shape"]), blob[base + a:base + b]))
    return entries, meta


def tensor_entry(name: str, t) -> Entry:
    import torch
    codes = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    t = t.detach().contiguous().cpu()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return Entry(name, codes[t.dtype], list(t.shape), data)


def _toml_key(k: str) -> str:
    if k and all(c.isalnum() or c in "_-" for c in k):
        return k
    return json.dumps(k)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


def to_toml(d: dict) -> str:
    """A small TOML writer (tables of scalars/arrays/inline tables; arrays of tables for lists of dicts)."""
    lines = []
    for k, v in d.items():
        if not isinstance(v, dict) and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
            lines.append(f"{_toml_key(str(k))} = {_toml_value(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{_toml_key(str(k))}]")
            for kk, vv in v.items():
                lines.append(f"{_toml_key(str(kk))} = {_toml_value(vv)}")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for x in v:
                lines.append(f"\n[[{_toml_key(str(k))}]]")
                for kk, vv in x.items():
                    lines.append(f"{_toml_key(str(kk))} = {_toml_value(vv)}")
    return "\n".join(lines) + "\n"


#: strings that make trouble: terminal escapes, bidi overrides, NULs, surrogates, huge, regex bombs
def hostile_string(rng: random.Random) -> str:
    choices = [
        "\x1b[2J\x1b[31mowned\x1b[0m", "\x1b]0;title\x07", "\u202eevil\u202c", "\u200b\u200d\ufeff", "a\x00b",
        "\r\x08\x08\x08", "\x9b31m", "\u2028\u2029", "", " ", "é" * 3, "\U0001F600", "../../etc/passwd",
        "{\"a\": 1}", "nan", "inf", "-1", "0", "1e309", "__import__('os').system('id')", "${HOME}", "%s%n",
        "(a+)+$", "re:(a*)*b", "re:[", "*", "**", "x" * rng.choice([1, 100, 10_000, 200_000]),
        "\ud800" if rng.random() < 0.1 else "lone",
    ]
    s = rng.choice(choices)
    if rng.random() < 0.3:
        s = "".join(rng.choice(choices[:12]) for _ in range(rng.randint(1, 4)))
    return s


def hostile_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if r < 0.2:
        return hostile_string(rng)
    if r < 0.35:
        return rng.choice([0, -1, 1, 2, 3, 2 ** 31, 2 ** 63 - 1, -(2 ** 63), 10 ** 6])
    if r < 0.5:
        return rng.choice([0.0, -0.5, 1.5, 1e-30, 1e30, 1e308, float("nan"), float("inf"), -float("inf")])
    if r < 0.6:
        return rng.random() < 0.5
    if r < 0.8 and depth < 3:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 3:
        return {hostile_string(rng)[:20] or "k": hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return "leaf"


def mutate_bytes(rng: random.Random, b: bytes, n: int | None = None) -> bytes:
    """Byte-level mutations: flips, overwrites with interesting bytes, inserts, deletes, truncation."""
    b = bytearray(b)
    for _ in range(n or rng.randint(1, 6)):
        op = rng.random()
        if not b:
            b += bytes([rng.randrange(256)])
            continue
        i = rng.randrange(len(b))
        if op < 0.3:
            b[i] ^= 1 << rng.randrange(8)
        elif op < 0.5:
            b[i] = rng.choice([0, 0xFF, 0x7F, 0x80, 0x22, 0x5C, 0x7B, 0x7D, 0x5B, 0x5D, 0x2C, 0x3A, 0x1B, 0x0A])
        elif op < 0.65:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op < 0.8:
            del b[i:i + rng.randint(1, 64)]
        elif op < 0.9:
            del b[i:]
        else:
            j = rng.randrange(len(b))
            k = rng.randint(1, 32)
            b[i:i + k] = b[j:j + k]
    return bytes(b)


# ==============================================================================================
# The seed corpus: valid files of every kind, built once (tiny models, no downloads)
# ==============================================================================================

#: (name, algorithm, options) of the seed adapters (on the tiny SD1 model, preset "full")
ALGOS = (("lora", "lora", {}), ("lora-tucker", "lora", {"use_tucker": True}), ("loha", "loha", {}),
         ("loha-tucker", "loha", {"use_tucker": True}), ("lokr", "lokr", {"factor": 4}),
         ("lokr-full", "lokr", {"factor": 4, "full_matrix": True}),
         ("lokr-both", "lokr", {"factor": 4, "decompose_both": True}), ("ia3", "ia3", {}), ("full", "full", {}),
         ("diag-oft", "diag-oft", {}), ("boft", "boft", {}), ("glora", "glora", {}), ("dylora", "dylora", {}),
         ("lora-dora", "lora", {"dora": True}), ("loha-dora", "loha", {"dora": True}), ("norm", "lora", {}))


class Corpus:
    """Valid inputs to mutate. Built lazily; ``Corpus.shared()`` caches one per process."""

    _shared: "Corpus | None" = None

    def __init__(self, workdir: str | None = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="lyco-fuzz-corpus-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._models: dict[str, Any] = {}
        self._adapters: dict[str, tuple[dict[str, list[Entry]], dict]] | None = None
        self._peft: list[tuple[list[Entry], dict]] | None = None
        self._single: tuple[list[Entry], dict] | None = None
        self._legacy: bytes | None = None

    @classmethod
    def shared(cls) -> "Corpus":
        if cls._shared is None:
            cls._shared = Corpus()
        return cls._shared

    # -- models ---------------------------------------------------------------------------
    def components(self, family: str) -> dict:
        if family not in self._models:
            import torch
            from .models import tiny
            with torch.no_grad():
                comps = tiny.tiny_components(family, seed=0)
            self._models[family] = comps
        return self._models[family]

    def sd_target(self, family: str = "sd1") -> dict:
        return {k: v for k, v in self.components(family).items() if k in ("unet", "text_encoder", "text_encoder_2")}

    # -- adapters -----------------------------------------------------------------------------
    def adapters(self) -> dict[str, tuple[dict[str, list[Entry]], dict]]:
        """algo name → ({module key: [entries]}, metadata) of a real lyco file."""
        if self._adapters is None:
            import lyco
            from .formats import kohya, metadata as md_mod
            out = {}
            specs = [(f"sd1-{n}", "sd1", algo, kw) for n, algo, kw in ALGOS] + [
                ("sdxl-lora", "sdxl", "lora", {}), ("sd2-loha", "sd2", "loha", {})]
            for name, fam, algo, kw in specs:
                kw = dict(kw)
                preset = "full"
                if name == "sd1-norm":
                    preset = {"unet": {"target_names": ["*.norm", "*.norm1", "*.norm2", "*.proj_in"]},
                              "include_norm": True}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    net = lyco.create(self.sd_target(fam), algo=algo, rank=2, preset=preset, seed=1,
                                      conv_rank=2, **kw)
                    try:
                        a = net.to_adapter()
                    finally:
                        net.detach()
                sd = kohya.to_state_dict(a)
                meta = md_mod.adapter_metadata(a, sd)
                groups: dict[str, list[Entry]] = {}
                for k, t in sd.items():
                    groups.setdefault(k.partition(".")[0], []).append(tensor_entry(k, t))
                out[name] = (groups, meta)
            self._adapters = out
        return self._adapters

    def peft_files(self) -> list[tuple[list[Entry], dict]]:
        if self._peft is None:
            from .formats import kohya, peft
            res = []
            for name in ("sd1-lora", "sd1-lora-dora", "sdxl-lora"):
                groups, meta = self.adapters()[name]
                sd = {}
                import torch
                for es in groups.values():
                    for e in es:
                        sd[e.name] = _entry_tensor(e)
                a = kohya.from_state_dict(sd, meta)
                tensors, pmeta = peft.to_peft(a)
                res.append(([tensor_entry(k, v) for k, v in tensors.items()], pmeta))
            self._peft = res
        return self._peft

    def single_file(self) -> tuple[list[Entry], dict]:
        if self._single is None:
            from .formats.checkpoint import to_single_file
            p = self.workdir / "tiny-sd1.safetensors"
            if not p.exists():
                to_single_file(self.components("sd1"), p, "sd1", extra_configs={"tokenizer": "lyco-tiny-clip"})
            self._single = parse_st(p.read_bytes())
        return self._single


def _entry_tensor(e: Entry):
    import torch
    dt = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}[e.dtype]
    if not e.data:
        return torch.empty(e.shape, dtype=dt)
    return torch.frombuffer(bytearray(e.data), dtype=dt).reshape(e.shape).clone()


# ==============================================================================================
# Mutators
# ==============================================================================================

def _rand_shape(rng: random.Random, shape: list) -> list:
    op = rng.random()
    s = list(shape)
    if op < 0.15:
        return s[::-1]
    if op < 0.3:
        return s + [1]
    if op < 0.4:
        return s[1:]
    if op < 0.5:
        return []
    if op < 0.6 and s:
        s[rng.randrange(len(s))] = 0
        return s
    if op < 0.7 and s:
        s[rng.randrange(len(s))] += rng.choice([-1, 1, 3])
        return [max(0, x) for x in s]
    if op < 0.8:
        return [1] * rng.randint(5, 17)
    if op < 0.9 and s:
        i = rng.randrange(len(s))
        s[i] = s[i] * 2
        return s
    return [rng.choice([0, 1, 2, 3, 4, 8, 16, 64]) for _ in range(rng.randint(1, 5))]


def _resize_data(rng: random.Random, e: Entry, shape: list, dtype: str | None = None) -> Entry:
    dtype = dtype or e.dtype
    n = math.prod(shape) * ST_DTYPES[dtype]
    if n > 1 << 22:  # keep inputs small
        shape = [0] + shape[1:]
        n = 0
    data = (e.data * (n // max(1, len(e.data)) + 1))[:n] if e.data else bytes(n)
    return Entry(e.name, dtype, shape, data)


def _special_values(rng: random.Random, e: Entry) -> Entry:
    import struct as st
    if e.dtype not in ("F32", "F16", "BF16", "F64") or not e.data:
        return e
    size = ST_DTYPES[e.dtype]
    vals = {"F32": [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff", st.pack("<f", 3e38)],
            "F16": [b"\x00\x7e", b"\x00\x7c", b"\x00\xfc", b"\xff\x7b"],
            "BF16": [b"\xc0\x7f", b"\x80\x7f", b"\x80\xff"],
            "F64": [st.pack("<d", float("nan")), st.pack("<d", float("inf")), st.pack("<d", 1e308)]}[e.dtype]
    b = bytearray(e.data)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(b) // size) * size
        b[i:i + size] = rng.choice(vals)
    return Entry(e.name, e.dtype, e.shape, bytes(b))


_SUFFIXES = ["lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "hada_w1_a", "hada_w1_b",
             "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
             "lokr_w2_a", "lokr_w2_b", "lokr_t2", "weight", "on_input", "diff", "diff_b", "w_norm", "b_norm",
             "oft_blocks", "oft_diag", "a1.weight", "a2.weight", "b1.weight", "b2.weight", "dora_scale",
             "scalar", "bias_indices", "unknown.thing", ""]
_PREFIXES = ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_", "oft_unet_", "",
             "lora_unet_input_blocks_4_1_", "lora_unet_down_blocks_9_attentions_0_", "base_model.model."]


def _pick_groups(rng: random.Random, groups: dict[str, list[Entry]], sizes: list[int]) -> list[Entry]:
    """The entries (copied) of ``rng.choice(sizes)`` groups picked at random (all when fewer)."""
    keys = sorted(groups)
    picked = rng.sample(keys, min(len(keys), rng.choice(sizes)))
    return [Entry(e.name, e.dtype, list(e.shape), e.data) for k in picked for e in groups[k]]


def _mutation_steps(rng: random.Random, entries: list[Entry], kinds: list[str], rounds: list[int], n_ops: int):
    """The loop of the structure-aware mutators: ``rng.choice(rounds)`` times, an operation number in
    ``range(n_ops)`` and a random entry, yielded as ``(op, i, entries[i])`` for the caller to apply
    (it must change ``entries`` in place). Operation 0 is the same for every mutator and done here,
    not yielded: the entry gets a random new shape. Stops early once ``entries`` is empty."""
    for _ in range(rng.choice(rounds)):
        op = rng.randrange(n_ops)
        if not entries:
            return
        i = rng.randrange(len(entries))
        e = entries[i]
        if op == 0:
            entries[i] = _resize_data(rng, e, _rand_shape(rng, e.shape)); kinds.append("shape")
        else:
            yield op, i, e


def mutate_adapter(rng: random.Random, groups: dict[str, list[Entry]], meta: dict) -> tuple[list[Entry], dict, str]:
    """Structure-aware mutations of a kohya/LyCORIS file: returns entries, metadata, a kind label."""
    keys = sorted(groups)
    entries = _pick_groups(rng, groups, [1, 1, 2, 3, 6])
    meta = dict(meta)
    kinds: list[str] = []
    for op, i, e in _mutation_steps(rng, entries, kinds, [0, 1, 1, 1, 2, 3], 17):
        if op == 1:
            dt = rng.choice(list(ST_DTYPES))
            entries[i] = _resize_data(rng, e, e.shape, dt); kinds.append("dtype")
        elif op == 2:
            entries[i] = _special_values(rng, e); kinds.append("nonfinite")
        elif op == 3:
            del entries[i]; kinds.append("drop-tensor")
        elif op == 4:
            mod, _, _ = e.name.partition(".")
            entries.append(Entry(f"{mod}.{rng.choice(_SUFFIXES)}", e.dtype, e.shape, e.data)); kinds.append("add-tensor")
        elif op == 5:
            mod, _, suf = e.name.partition(".")
            entries[i] = Entry(f"{mod}.{rng.choice(_SUFFIXES)}", e.dtype, e.shape, e.data); kinds.append("rename-suffix")
        elif op == 6:
            mod, _, suf = e.name.partition(".")
            body = mod.split("_", 2)[-1]
            new = rng.choice(_PREFIXES) + rng.choice([body, body.replace("_", "."), body + "_x", "", "0_1_2",
                                                    hostile_string(rng)[:300]])
            for j, x in enumerate(entries):
                if x.name.partition(".")[0] == mod:
                    entries[j] = Entry(f"{new}.{x.name.partition('.')[2]}", x.dtype, x.shape, x.data)
            kinds.append("rename-module")
        elif op == 7:  # alpha trouble
            mod = e.name.partition(".")[0]
            val = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e30, 1e-30])
            shape = rng.choice([[], [1], [2], [1, 1]])
            n = math.prod(shape)
            entries[:] = [x for x in entries if x.name != f"{mod}.alpha"]  # in place: the steps iterate it
            entries.append(Entry(f"{mod}.alpha", "F32", shape, struct.pack("<f", val) * n)); kinds.append("alpha")
        elif op == 8:  # a second algorithm's tensors in the same module
            other = groups[rng.choice(keys)]
            mod = e.name.partition(".")[0]
            for x in other:
                entries.append(Entry(f"{mod}.{x.name.partition('.')[2]}", x.dtype, x.shape, x.data))
            kinds.append("mixed-algo")
        elif op == 9:
            meta[hostile_string(rng)[:200] or "k"] = hostile_string(rng); kinds.append("meta-hostile")
        elif op == 10:
            k = rng.choice(["lyco_family", "ss_base_model_version", "lyco_oft_constraint", "lyco_dora_axis",
                            "lora_adapter_metadata", "modelspec.architecture", "ss_network_args",
                            "lyco_lokr_full_scale", "ss_tag_frequency", "lyco_train_config", "sshs_model_hash"])
            meta[k] = rng.choice([hostile_string(rng), "sdxl", "sd2", "sd1", "sd3", "comfyui", "input",
                                  json.dumps(hostile_value(rng)), "{", "null", "[]", "{\"r\": 0}"])
            kinds.append("meta-known")
        elif op == 11:
            entries[i] = Entry(e.name, e.dtype, e.shape, bytes(len(e.data))); kinds.append("zeros")
        elif op == 12:  # the same module twice under both UNet naming styles / LDM names
            mod = e.name.partition(".")[0]
            twin = mod.replace("down_blocks_1_attentions_0", "input_blocks_4_1").replace(
                "lora_unet_input_blocks_4_1", "lora_unet_down_blocks_1_attentions_0")
            entries += [Entry(x.name.replace(mod, twin + ("" if twin != mod else "_")), x.dtype, x.shape, x.data)
                        for x in list(entries) if x.name.startswith(mod + ".")]
            kinds.append("twin-names")
        elif op == 13:  # huge declared shape with zero elements (no data, no allocation)
            entries[i] = Entry(e.name, e.dtype, [0, rng.choice([2 ** 31, 2 ** 40, 2 ** 62, 10 ** 18])], b"")
            kinds.append("huge-shape")
        elif op == 14:
            entries[i] = Entry(e.name, e.dtype, [int(x) for x in e.shape] if e.shape else [], e.data[: len(e.data) // 2])
            entries[i] = _resize_data(rng, entries[i], e.shape[:1] + [max(1, (e.shape[1] if len(e.shape) > 1 else 1) // 2)]
                                      + e.shape[2:] if e.shape else [])
            kinds.append("half")
        elif op == 15:  # many tiny modules
            for j in range(rng.choice([50, 300])):
                entries.append(Entry(f"lora_unet_m{j}.lora_down.weight", "F32", [1, 1], b"\0\0\x80?"))
                entries.append(Entry(f"lora_unet_m{j}.lora_up.weight", "F32", [1, 1], b"\0\0\x80?"))
            kinds.append("many-modules")
        else:
            meta = {} if rng.random() < 0.5 else {"ss_network_module": "networks.lora"}; kinds.append("meta-drop")
    return entries, meta, "+".join(sorted(set(kinds))) or "valid-subset"


_MANY: dict[int, bytes] = {}


def _many_tensors(n: int) -> bytes:
    """A header listing ``n`` empty tensors (cached: the same bytes every time)."""
    if n not in _MANY:
        raw = ("{" + ",".join(f'"t{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}' for i in range(n))
               + "}").encode()
        _MANY[n] = struct.pack("<Q", len(raw)) + raw
    return _MANY[n]


def mutate_header(rng: random.Random, entries: list[Entry], meta: dict) -> tuple[bytes, str]:
    """Header-level corruption of a safetensors file (offsets, lengths, dtypes, JSON)."""
    header: dict[str, Any] = {"__metadata__": dict(meta)} if meta else {}
    off = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [off, off + len(e.data)]}
        off += len(e.data)
    data = b"".join(e.data for e in entries)
    names = [e.name for e in entries]
    op = rng.randrange(20)
    kind = "header"
    if names:
        n = rng.choice(names)
        h = header[n]
    if op == 0 and names:
        h["data_offsets"] = [rng.choice([-1, 0, 1, off, off + 1, 2 ** 64, 2 ** 63]), rng.choice([0, off, off + 8, -5])]; kind = "offsets"
    elif op == 1 and names:
        h["data_offsets"] = [0, len(data)]; kind = "overlap"
    elif op == 2 and names:
        h["dtype"] = rng.choice(["F128", "f32", "", 5, None, "C64", "U1", "F8_E8M0", "BOOL", "U64"]); kind = "dtype-code"
    elif op == 3 and names:
        h["shape"] = rng.choice([[-1], [1.5], ["3"], [True], None, 7, [2 ** 64], [1] * 40, [[1]]]); kind = "shape-type"
    elif op == 4 and names:
        h["shape"] = [2 ** 31, 2 ** 31, 2 ** 31]; kind = "huge-shape"
    elif op == 5 and names:
        h["extra"] = 1; kind = "extra-field"
    elif op == 6 and names:
        del h[rng.choice(["dtype", "shape", "data_offsets"])]; kind = "missing-field"
    elif op == 7:
        header["__metadata__"] = rng.choice([{"a": 1}, {"a": None}, ["x"], "s", {"a": {"b": "c"}}, None]); kind = "meta-type"
    elif op == 8:
        raw = b'{"a":' * rng.choice([1000, 100_000]) + b"1" + b"}" * 10
        return struct.pack("<Q", len(raw)) + raw, "deep-json"
    elif op == 9:
        raw = json.dumps(header).encode()
        raw = raw.replace(b'"', b'"\xff', 1) if rng.random() < 0.5 else b"\xfe\xff" + raw
        return struct.pack("<Q", len(raw)) + raw + data, "non-utf8"
    elif op == 10:
        raw = json.dumps(header).encode()
        if names:
            raw = raw[:-1] + b"," + json.dumps(names[0]).encode() + b":" + json.dumps(header[names[0]]).encode() + b"}"
        return struct.pack("<Q", len(raw)) + raw + data, "duplicate-key"
    elif op == 11:
        raw = json.dumps(header).encode()
        n_len = rng.choice([0, 1, len(raw) - 1, len(raw) + 1, 2 ** 64 - 1, 2 ** 40, 100 * 1024 * 1024 + 1, len(raw) + len(data)])
        return struct.pack("<Q", n_len) + raw + data, "header-length"
    elif op == 12:
        raw = json.dumps(rng.choice([[], "x", 1, None, [1, 2], True])).encode()
        return struct.pack("<Q", len(raw)) + raw, "header-not-object"
    elif op == 13:
        return _many_tensors(rng.choice([2000, 60_000])), "many-tensors"
    elif op == 14:
        return data, "no-header"
    elif op == 15:
        b = st_bytes(entries, meta)
        return b[: rng.randrange(max(1, len(b)))], "truncated"
    elif op == 16:
        return st_bytes(entries, meta) + bytes(rng.randint(1, 64)), "trailing"
    elif op == 17 and names:
        h["shape"] = [0, 2 ** 62, 2 ** 62]; h["data_offsets"] = [0, 0]; kind = "zero-huge-shape"
    elif op == 18:
        header[hostile_string(rng)[:1000] or "x"] = {"dtype": "U8", "shape": [0], "data_offsets": [off, off]}; kind = "hostile-name"
    else:
        return b"", "empty"
    raw = json.dumps(header, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data, kind


# ==============================================================================================
# Readers
# ==============================================================================================

@dataclass
class Case:
    kind: str
    path: str | None = None          # a file or folder made for the case
    text: str | None = None          # or an in-memory input
    marker: str | None = None        # must never exist after the case


class Context:
    """Per-run state: a scratch folder, the corpus, the tiny models."""

    def __init__(self, workdir: Path, corpus: Corpus):
        self.workdir, self.corpus = workdir, corpus
        self.n_attach = 0

    def fresh(self, name: str) -> Path:
        d = self.workdir / "case"
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
            if d.exists():
                for p in d.rglob("*"):
                    with contextlib.suppress(OSError):
                        p.chmod(0o755)
                shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)
        return d / name


# -- safetensors ---------------------------------------------------------------------------------

def _gen_safetensors(rng: random.Random, ctx: Context) -> Case:
    adapters = ctx.corpus.adapters()
    groups, meta = adapters[rng.choice(sorted(adapters))]
    entries, meta, _ = mutate_adapter(rng, groups, meta) if rng.random() < 0.3 else (
        [e for k in rng.sample(sorted(groups), min(3, len(groups))) for e in groups[k]], meta, "")
    r = rng.random()
    if r < 0.6:
        blob, kind = mutate_header(rng, entries, meta)
    else:
        blob, kind = mutate_bytes(rng, st_bytes(entries, meta)), "bytes"
    p = ctx.fresh("x.safetensors")
    p.write_bytes(blob)
    return Case(kind, str(p))


def _run_safetensors(case: Case, ctx: Context) -> None:
    from .formats import safetensors_io as S
    h = S.read_header(case.path)
    tensors, meta = S.load_tensors(case.path)
    assert set(tensors) == set(h.tensors)
    for k, t in tensors.items():
        assert tuple(t.shape) == h.tensors[k].shape, k
    from .prompt import read_header_metadata
    read_header_metadata(case.path)


# -- kohya / LyCORIS -----------------------------------------------------------------------------

def _gen_kohya(rng: random.Random, ctx: Context) -> Case:
    adapters = ctx.corpus.adapters()
    name = rng.choice(sorted(adapters))
    groups, meta = adapters[name]
    entries, meta, kind = mutate_adapter(rng, groups, meta)
    if rng.random() < 0.15:
        blob, k2 = mutate_header(rng, entries, meta)
        kind += "+" + k2
    elif rng.random() < 0.1:
        blob = mutate_bytes(rng, st_bytes(entries, meta))
        kind += "+bytes"
    else:
        blob = st_bytes(entries, meta)
    p = ctx.fresh("adapter.safetensors")
    p.write_bytes(blob)
    return Case(f"{name.split('-', 1)[1]}:{kind}", str(p))


def _use_adapter(a, ctx: Context, family_hint: str | None = None) -> None:
    """What a user does with a file that loaded: inspect it, attach it to a model (non-strict)."""
    from .tools.inspect import format_report, inspect_adapter
    info = inspect_adapter(a)
    text = format_report(info)
    bad = unsafe_chars(text)
    if bad:
        raise _UnsafeOutput(f"lyco inspect printed raw control characters {sorted({hex(ord(c)) for c in bad})[:6]}")
    for line in text.splitlines():
        if len(line) > 1200:
            raise _UnsafeOutput(f"lyco inspect printed a line of {len(line)} characters")
    json.dumps(info, default=str)
    ctx.n_attach += 1
    if ctx.n_attach % 4 == 0:  # attaching walks the model: every 4th loaded file
        fam = a.family if a.family in ("sd1", "sd2", "sdxl") else "sd1"
        target = ctx.corpus.sd_target(fam)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = a.attach(target, strict=False)
            net.detach()


class _UnsafeOutput(Exception):
    pass


def _run_kohya(case: Case, ctx: Context) -> None:
    import lyco
    a = lyco.load(case.path)
    _use_adapter(a, ctx)
    lyco.load(case.path, check_finite=False)


# -- PEFT / diffusers ----------------------------------------------------------------------------

_PEFT_ROLES = [".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora.down.weight", ".lora.up.weight",
               ".lora_magnitude_vector", ".alpha", ".lora_B.bias", ".hada_w1_a", ".lokr_w1", "_lora.down.weight",
               ".lora_linear_layer.up.weight", ".weight", ""]


def _gen_peft(rng: random.Random, ctx: Context) -> Case:
    files = ctx.corpus.peft_files()
    entries, meta = files[rng.randrange(len(files))]
    mods: dict[str, list[Entry]] = {}
    for e in entries:
        m = e.name.rsplit(".lora_", 1)[0]
        mods.setdefault(m, []).append(e)
    entries = _pick_groups(rng, mods, [1, 2, 4])
    meta = dict(meta)
    kinds: list[str] = []
    for op, i, e in _mutation_steps(rng, entries, kinds, [0, 1, 1, 2, 3], 10):
        if op == 1:
            base = e.name
            for r in _PEFT_ROLES:
                if r and base.endswith(r):
                    base = base[: -len(r)]
                    break
            entries[i] = Entry(base + rng.choice(_PEFT_ROLES), e.dtype, e.shape, e.data); kinds.append("role")
        elif op == 2:
            cfg = {}
            try:
                cfg = json.loads(meta.get("lora_adapter_metadata", "{}"))
            except ValueError:
                pass
            if not isinstance(cfg, dict):
                cfg = {}
            k = rng.choice(sorted(cfg) or ["r"])
            cfg[rng.choice([k, "unet.r", "unet.lora_alpha", "unet.rank_pattern", "unet.alpha_pattern",
                            "text_encoder.use_rslora", "r", "lora_alpha", "rank_pattern"])] = hostile_value(rng)
            if rng.random() < 0.3:
                cfg["unet.rank_pattern"] = {rng.choice(["(a+)+$", "[", "to_q", ".*", "re:(", "\\"]): 3}
            meta["lora_adapter_metadata"] = json.dumps(cfg, allow_nan=True); kinds.append("config")
        elif op == 3:
            meta["lora_adapter_metadata"] = rng.choice(["{", "[]", "null", "1", hostile_string(rng), "{\"r\": \"x\"}"])
            kinds.append("config-junk")
        elif op == 4:
            del entries[i]; kinds.append("drop")
        elif op == 5:
            entries[i] = _special_values(rng, e); kinds.append("nonfinite")
        elif op == 6:
            entries[i] = Entry(rng.choice(["base_model.model.", "unet.", "text_encoder.", "text_encoder_2.", "vae.", ""])
                               + e.name.split(".", 1)[-1], e.dtype, e.shape, e.data); kinds.append("prefix")
        elif op == 7:
            entries.append(Entry(e.name.rsplit(".lora_", 1)[0] + ".alpha", "F32",
                                 rng.choice([[], [1], [3]]), struct.pack("<f", rng.choice([0.0, -4.0, float("nan"), 8.0]))
                                 * 3)); entries[-1] = _resize_data(rng, entries[-1], entries[-1].shape); kinds.append("alpha")
        elif op == 8:
            entries[i] = _resize_data(rng, e, e.shape, rng.choice(list(ST_DTYPES))); kinds.append("dtype")
        else:
            entries.append(Entry(hostile_string(rng)[:500] + ".lora_A.weight", e.dtype, e.shape, e.data)); kinds.append("hostile-name")
    names = set()
    entries = [e for e in entries if not (e.name in names or names.add(e.name))]
    blob = st_bytes(entries, meta)
    suffix = ".safetensors"
    p = ctx.fresh("peft" + suffix)
    p.write_bytes(blob)
    return Case("+".join(sorted(set(kinds))) or "valid-subset", str(p))


def _run_peft(case: Case, ctx: Context) -> None:
    import lyco
    from .formats import peft
    a = lyco.load(case.path)
    _use_adapter(a, ctx)
    peft.load(case.path)


# -- legacy pickles --------------------------------------------------------------------------------

class _Reduce:
    """An object whose pickle calls ``fn(*args)`` when unpickled by an unsafe loader."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def evil_payloads(marker: str) -> list[tuple[str, Any]]:
    """Pickle payloads that would create ``marker`` if executed (never executed here)."""
    import builtins
    import subprocess
    return [
        ("os.mkdir", _Reduce(os.mkdir, marker)),
        ("os.system", _Reduce(os.system, f"touch '{marker}'")),
        ("builtins.exec", _Reduce(builtins.exec, f"open({marker!r}, 'w').close()")),
        ("builtins.eval", _Reduce(builtins.eval, f"open({marker!r}, 'w')")),
        ("subprocess.call", _Reduce(subprocess.call, ["touch", marker])),
        ("builtins.open", _Reduce(builtins.open, marker, "w")),
        ("shutil.copy", _Reduce(shutil.copyfile, "/etc/hostname", marker)),
    ]


def _torch_save_bytes(obj, zip_format: bool = True) -> bytes:
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


def _random_pickle(rng: random.Random, marker: str) -> tuple[bytes, str]:
    """A pickle stream: random opcodes, or a structured one referencing globals."""
    r = rng.random()
    if r < 0.4:
        name, payload = rng.choice(evil_payloads(marker))
        obj = {"state_dict": {"w": payload}} if rng.random() < 0.5 else payload
        return pickle.dumps(obj, protocol=rng.choice([0, 2, 4, 5])), f"evil-{name}"
    if r < 0.7:
        ops = [pickle.PROTO + b"\x02", pickle.EMPTY_DICT, pickle.MARK, pickle.EMPTY_LIST, pickle.NONE,
               pickle.BININT1 + bytes([rng.randrange(256)]), pickle.SHORT_BINSTRING + b"\x01a",
               pickle.GLOBAL + rng.choice([b"os\nsystem\n", b"builtins\neval\n", b"torch._utils\n_rebuild_tensor_v2\n",
                                           b"collections\nOrderedDict\n", b"torch\nFloatStorage\n",
                                           b"__builtin__\nset\n", b"torch.nn.parameter\nParameter\n"]),
               pickle.TUPLE, pickle.REDUCE, pickle.BUILD, pickle.SETITEMS, pickle.APPEND, pickle.POP,
               pickle.BINPUT + b"\x00", pickle.BINGET + b"\x00", pickle.BINPERSID, pickle.DUP,
               pickle.LONG4 + b"\xff\xff\xff\x7f", pickle.BINUNICODE + b"\xff\xff\xff\x7f"]
        body = b"".join(rng.choice(ops) for _ in range(rng.randint(1, 30)))
        return body + pickle.STOP, "random-opcodes"
    obj = {"a": 1, "b": [1, 2, 3], "c": "x"}
    return mutate_bytes(rng, pickle.dumps(obj, protocol=2)), "mutated-plain"


def _gen_legacy(rng: random.Random, ctx: Context) -> Case:
    import torch
    marker = str(ctx.workdir / "MARKER")
    suffix = rng.choice([".pt", ".ckpt", ".pth", ".bin"])
    p = ctx.fresh("legacy" + suffix)
    r = rng.random()
    if r < 0.3:
        raw, kind = _random_pickle(rng, marker)
        if rng.random() < 0.5:  # inside a torch zip archive as data.pkl
            base = _torch_save_bytes({"w": torch.zeros(2)})
            blob = _replace_zip_member(base, "data.pkl", raw)
            kind = "zip:" + kind
        else:
            blob = raw
    elif r < 0.55:
        name, payload = rng.choice(evil_payloads(marker))
        inner = rng.choice([{"w": torch.ones(2), "evil": payload}, {"state_dict": {"w": payload}}, payload,
                            [torch.ones(1), payload]])
        blob = _torch_save_bytes(inner, zip_format=rng.random() < 0.8)
        kind = f"torch-save-evil-{name}"
    else:
        val = rng.choice([{"lora_unet_a.lora_down.weight": torch.ones(2, 3), "lora_unet_a.lora_up.weight": torch.ones(3, 2)},
                          {"state_dict": {"model.diffusion_model.out.2.weight": torch.ones(1)}}, {"x": 1},
                          [torch.ones(1)], torch.ones(3), {1: torch.ones(1)}, {"a": {"b": torch.ones(1)}}, "str",
                          {"w": torch.ones(2, dtype=torch.float16) * float("nan")}])
        blob = _torch_save_bytes(val, zip_format=rng.random() < 0.8)
        kind = "torch-save"
        if rng.random() < 0.6:
            if zipfile.is_zipfile(io.BytesIO(blob)) and rng.random() < 0.5:
                blob = _mutate_zip(rng, blob)
                kind += "+zip-member"
            else:
                blob = mutate_bytes(rng, blob)
                kind += "+bytes"
    p.write_bytes(blob)
    return Case(kind, str(p), marker=marker)


def _replace_zip_member(blob: bytes, suffix: str, data: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(blob))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            content = data if info.filename.endswith(suffix) else src.read(info)
            dst.writestr(info.filename, content)
    return out.getvalue()


def _mutate_zip(rng: random.Random, blob: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(blob))
    infos = src.infolist()
    victim = rng.choice(infos).filename
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in infos:
            content = src.read(info)
            if info.filename == victim:
                op = rng.random()
                if op < 0.5:
                    content = mutate_bytes(rng, content)
                elif op < 0.7:
                    continue
                elif op < 0.85:
                    content = content * 2
                else:
                    content = b""
            dst.writestr(info.filename, content)
    return out.getvalue()


def _run_legacy(case: Case, ctx: Context) -> None:
    import lyco
    from .formats import safetensors_io as S
    from .formats.checkpoint import open_checkpoint
    errors = []
    for fn in (lambda: lyco.load(case.path), lambda: S.load_legacy(case.path),
               lambda: open_checkpoint(case.path).close()):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 — collected, first non-lyco one is re-raised
            errors.append(e)
    for e in errors:
        if not isinstance(e, __import__("lyco").errors.LycoError):
            raise e
    if errors:
        raise errors[0]


# -- base checkpoints ------------------------------------------------------------------------------

def _gen_checkpoint(rng: random.Random, ctx: Context) -> Case:
    entries, meta = ctx.corpus.single_file()
    entries = list(entries)
    meta = dict(meta)
    kinds = []
    if rng.random() < 0.85:  # a smaller file: a random subset of the tensors (keeps cases fast)
        entries = rng.sample(entries, max(1, int(len(entries) * rng.choice([0.02, 0.1, 0.3]))))
        kinds.append("subset")
    for _ in range(rng.choice([0, 1, 1, 2])):
        op = rng.randrange(9)
        i = rng.randrange(len(entries)) if entries else 0
        if op == 0 and entries:
            entries[i] = _resize_data(rng, entries[i], _rand_shape(rng, entries[i].shape)); kinds.append("shape")
        elif op == 1:
            try:
                cfg = json.loads(meta.get("lyco.configs", "{}"))
            except ValueError:
                cfg = {}
            if not isinstance(cfg, dict):
                cfg = {}
            comp = rng.choice(["unet", "vae", "text_encoder", "scheduler", "family", "tokenizer"])
            if isinstance(cfg.get(comp), dict) and cfg[comp] and rng.random() < 0.7:
                k = rng.choice(sorted(cfg[comp]))
                cfg[comp][k] = hostile_value(rng) if rng.random() < 0.7 else None
                if rng.random() < 0.3:
                    del cfg[comp][k]
            else:
                cfg[comp] = hostile_value(rng)
            meta["lyco.configs"] = json.dumps(cfg, allow_nan=True); kinds.append("configs")
        elif op == 2:
            meta["lyco.configs"] = rng.choice(["{", "[]", "null", "{\"unet\": 1}", "{\"unet\": {}}", hostile_string(rng)])
            kinds.append("configs-junk")
        elif op == 3 and entries:
            e = entries[i]
            entries[i] = Entry(e.name.replace("model.diffusion_model.", rng.choice(
                ["model.diffusion_model.input_blocks.99.", "cond_stage_model.model.", "conditioner.embedders.1.model.",
                 "first_stage_model.", "", "model.diffusion_model."])), e.dtype, e.shape, e.data); kinds.append("rename")
        elif op == 4 and entries:
            entries[i] = _resize_data(rng, entries[i], entries[i].shape, rng.choice(list(ST_DTYPES))); kinds.append("dtype")
        elif op == 5:
            meta.pop("lyco.configs", None); kinds.append("no-configs")
        elif op == 6 and entries:  # fused in_proj of an OpenCLIP tower with a bad row count
            entries.append(Entry("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "F32",
                                 [rng.choice([3, 4, 0, 7]), 2], bytes(4 * 2 * 7)))
            entries[-1] = _resize_data(rng, entries[-1], entries[-1].shape); kinds.append("in_proj")
        elif op == 7 and entries:
            del entries[i]; kinds.append("drop")
        else:
            meta[hostile_string(rng)[:100] or "k"] = hostile_string(rng); kinds.append("meta")
    names = set()
    entries = [e for e in entries if not (e.name in names or names.add(e.name))]
    r = rng.random()
    if r < 0.2:
        blob, k = mutate_header(rng, entries, meta); kinds.append(k)
    elif r < 0.3:
        blob = mutate_bytes(rng, st_bytes(entries, meta)); kinds.append("bytes")
    else:
        blob = st_bytes(entries, meta)
    p = ctx.fresh("base.safetensors")
    p.write_bytes(blob)
    return Case("+".join(sorted(set(kinds))) or "valid", str(p))


def _run_checkpoint(case: Case, ctx: Context) -> None:
    from .formats.checkpoint import open_checkpoint
    with open_checkpoint(case.path) as ck:
        names = list(ck.mapping)
        for name in names[:: max(1, len(names) // 8)]:
            ck.canonical_shape(name)
            ck.get_canonical(name)
        for key in ck.keys()[:4]:
            ck.get(key)
            ck.dtype(key)


# -- presets (TOML) ---------------------------------------------------------------------------------

_PRESET_KEYS = ["name", "description", "include_conv", "include_norm", "overrides", "unet", "text_encoder", "model",
                "enable_conv", "target_module", "target_name", "module_algo_map", "name_algo_map", "lora_prefix",
                "use_fnmatch", "unet_target_module", "unet_target_name", "text_encoder_target_module",
                "text_encoder_target_name", "exclude_name", "bogus"]
_OVERRIDE_KEYS = ["pattern", "component", "module_class", "algo", "rank", "alpha", "dora", "factor", "dropout",
                  "use_tucker", "train_on_input", "block_size", "constraint", "dora_axis", "weird"]


def _preset_dict(rng: random.Random) -> dict:
    d: dict[str, Any] = {}
    for k in rng.sample(_PRESET_KEYS, rng.randint(1, 6)):
        if k in ("unet", "text_encoder", "model"):
            d[k] = {kk: rng.choice([["Linear"], ["Conv2d", "Attention"], ["*.to_q"], ["re:.*"], ["re:("],
                                    hostile_value(rng), "Linear", []])
                    for kk in rng.sample(["target_modules", "target_names", "exclude", "junk"], rng.randint(1, 3))}
        elif k == "overrides":
            d[k] = [{kk: (rng.choice(["lora", "loha", "lokr", "ia3", "full", "diag-oft", "boft", "glora", "nope"])
                          if kk == "algo" else rng.choice(["*", "re:.*", "re:[", "0.*", "Linear"]) if kk in ("pattern", "module_class")
                          else rng.choice([1, 2, 0, -1, 2.5, "x", True, 10 ** 9]) if kk in ("rank", "alpha", "factor", "block_size")
                          else hostile_value(rng))
                     for kk in rng.sample(_OVERRIDE_KEYS, rng.randint(1, 4))} for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.2:
                d[k] = hostile_value(rng)
        elif k in ("module_algo_map", "name_algo_map"):
            d[k] = {rng.choice(["Linear", "Conv2d", "*", "re:["]): rng.choice(
                [{"algo": "lokr", "dim": 2}, {"weight_decompose": True}, hostile_value(rng), "x"])}
        elif k in ("include_conv", "include_norm", "use_fnmatch", "enable_conv"):
            d[k] = rng.choice([True, False, "yes", 1])
        else:
            d[k] = rng.choice([["Linear"], ["*"], ["re:("], hostile_value(rng), "Linear"])
    return d


def _gen_preset(rng: random.Random, ctx: Context) -> Case:
    p = ctx.fresh("preset.toml")
    r = rng.random()
    if r < 0.7:
        text, kind = to_toml(_preset_dict(rng)), "structured"
    elif r < 0.85:
        text, kind = mutate_bytes(rng, to_toml(_preset_dict(rng)).encode()).decode("utf-8", "replace"), "bytes"
    else:
        text, kind = rng.choice([
            "a = " + "[" * 5000 + "]" * 5000, "a = " + "{b = " * 2000 + "1" + "}" * 2000, "\x00\x01", "[[unet]]\n",
            "unet = 1", "[unet]\ntarget_modules = [1, 2]", "overrides = 'x'", "overrides = [1]", "name = 1",
            "x = 1979-05-27T07:32:00Z", "[model]\ntarget_names = ['re:(a+)+$']\n"]), "crafted"
    if rng.random() < 0.1:
        p.write_bytes(b"\xff\xfe" + text.encode("utf-16-le")); kind += "+utf16"
    else:
        p.write_text(text, encoding="utf-8", errors="surrogatepass")
    return Case(kind, str(p))


def _small_model():
    import torch.nn as nn
    m = nn.Sequential()
    m.add_module("fc", nn.Linear(4, 6))
    m.add_module("conv", nn.Conv2d(2, 3, 3))
    m.add_module("pw", nn.Conv2d(3, 2, 1))
    m.add_module("norm", nn.LayerNorm(6))
    return m


def _run_preset(case: Case, ctx: Context) -> None:
    import lyco
    from . import presets
    pr = presets.get(case.path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = lyco.create(_small_model(), algo="lora", rank=2, preset=pr, seed=0)
        net.detach()


# -- trainer config (TOML) -------------------------------------------------------------------------

def _train_schema():
    import dataclasses
    from .train import config as C
    out = {}
    for s, cls in C.SECTIONS.items():
        out[s] = {f.name: f for f in dataclasses.fields(cls)}
    return out


def _gen_train_config(rng: random.Random, ctx: Context) -> Case:
    schema = _train_schema()
    d: dict[str, Any] = {"model": {"path": "tiny:sd1"}, "data": {"train_dir": str(ctx.workdir)}}
    for s in rng.sample(sorted(schema), rng.randint(1, len(schema))):
        sec = d.setdefault(s, {})
        for name in rng.sample(sorted(schema[s]), min(len(schema[s]), rng.randint(0, 4))):
            f = schema[s][name]
            default = f.default if f.default is not __import__("dataclasses").MISSING else None
            r = rng.random()
            if r < 0.35 and default is not None:  # a plausible value of the right type
                if isinstance(default, bool):
                    v = not default
                elif isinstance(default, int):
                    v = rng.choice([0, 1, -1, default * 2, 10 ** 12])
                elif isinstance(default, float):
                    v = rng.choice([0.0, -1.0, 1e30, default * 10, float("nan")])
                elif isinstance(default, str):
                    v = rng.choice(["", "x", default, "tiny:sdxl", "/nonexistent", hostile_string(rng)])
                else:
                    v = hostile_value(rng)
            else:
                v = hostile_value(rng)
            sec[name] = v
    if rng.random() < 0.1:
        d[rng.choice(["bogus", "Model", "train.x"])] = {"a": 1}
    if rng.random() < 0.1:
        d["train"] = rng.choice([1, "x", [1]])
    text = to_toml(d)
    kind = "structured"
    if rng.random() < 0.15:
        text = mutate_bytes(rng, text.encode()).decode("utf-8", "replace"); kind = "bytes"
    p = ctx.fresh("train.toml")
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    return Case(kind, str(p))


def _run_train_config(case: Case, ctx: Context) -> None:
    from .train import config as C
    cfg = C.load(case.path)
    C.commented_toml(cfg)
    with contextlib.suppress(Exception):  # check_runnable touches paths; its own errors are tested below
        pass
    try:
        C.check_runnable(cfg)
    except Exception as e:  # noqa: BLE001
        if not isinstance(e, __import__("lyco").errors.LycoError):
            raise


# -- dataset folders ------------------------------------------------------------------------------

def _png_bytes(rng: random.Random) -> bytes:
    from PIL import Image
    mode = rng.choice(["RGB", "RGBA", "L", "P", "LA", "1", "I;16", "CMYK"])
    size = (rng.choice([1, 2, 7, 16, 33]), rng.choice([1, 3, 16, 40]))
    im = Image.new(mode if mode != "I;16" else "I;16", size)
    fmt = rng.choice(["PNG", "PNG", "JPEG", "WEBP", "BMP", "GIF"])
    if fmt == "JPEG" and im.mode not in ("RGB", "L", "CMYK"):
        im = im.convert("RGB")
    buf = io.BytesIO()
    kw = {}
    if fmt in ("JPEG", "WEBP", "PNG") and rng.random() < 0.3:
        exif = Image.Exif()
        exif[0x0112] = rng.choice([1, 3, 5, 6, 8, 9, 0, 65535])
        kw["exif"] = exif.tobytes()
    if mode == "P" and fmt == "PNG" and rng.random() < 0.5:
        kw["transparency"] = 0
    try:
        im.save(buf, format=fmt, **kw)
    except (OSError, ValueError, KeyError):
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _huge_png_header(w: int, h: int) -> bytes:
    import zlib
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _gen_dataset(rng: random.Random, ctx: Context) -> Case:
    root = ctx.fresh("data")
    root.mkdir()
    kinds = []
    folders = [root]
    for _ in range(rng.randint(0, 3)):
        name = rng.choice(["2_cat", "0_x", "-1_x", "10_", "99999999999999999999_big", "1_" + hostile_string(rng)[:50],
                           "notrepeat", ".hidden", "3_a b", "1_é"])
        name = name.replace("/", "_").replace("\x00", "_") or "x"
        d = root / name
        with contextlib.suppress(OSError, ValueError):
            d.mkdir(exist_ok=True)
            folders.append(d)
            kinds.append("folder")
    for _ in range(rng.randint(0, 5)):
        folder = rng.choice(folders)
        stem = rng.choice(["a", "b", "img 1", "x.y", "UPPER", ".dot", "é"]) + str(rng.randrange(100))
        ext = rng.choice([".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".txt", ".gif"])
        r = rng.random()
        if r < 0.55:
            data = _png_bytes(rng); kinds.append("image")
        elif r < 0.7:
            data = mutate_bytes(rng, _png_bytes(rng)); kinds.append("image-mutated")
        elif r < 0.8:
            data = _png_bytes(rng)[: rng.randint(0, 60)]; kinds.append("image-truncated")
        elif r < 0.88:
            data = _huge_png_header(rng.choice([100_000, 2 ** 31 - 1, 20_000]), rng.choice([100_000, 1, 20_000]))
            kinds.append("image-huge-header")
        elif r < 0.94:
            data = b""; kinds.append("image-empty")
        else:
            data = os.urandom(rng.randint(1, 200)); kinds.append("image-garbage")
        p = folder / (stem + ext)
        with contextlib.suppress(OSError, ValueError):
            p.write_bytes(data)
        if rng.random() < 0.6:
            cap = rng.choice([b"a cat, sitting", b"\xff\xfe\x00bad utf8", b"", b"\n\n\n", b"x" * 100_000,
                              b"tag1,,,tag2,  ,", "\x1b[31mred\x1b[0m, \u202eevil".encode(), b"\x00" * 10,
                              b"line1\nline2\r\nline3", os.urandom(30)])
            with contextlib.suppress(OSError, ValueError):
                p.with_suffix(".txt").write_bytes(cap)
            kinds.append("caption")
    if rng.random() < 0.1:
        with contextlib.suppress(OSError):
            (root / "loop").symlink_to(root, target_is_directory=True); kinds.append("symlink-loop")
    if rng.random() < 0.05:
        with contextlib.suppress(OSError):
            (root / "dangling.png").symlink_to(root / "nope.png"); kinds.append("dangling-link")
    return Case("+".join(sorted(set(kinds))) or "empty", str(root))


def _run_dataset(case: Case, ctx: Context) -> None:
    """The trainer's data path without a model: scan, buckets, captions, and every image loaded,
    fitted to its bucket and turned into a tensor (what the latent cache and the loader do)."""
    import logging
    from .train import data as D
    logging.getLogger("lyco.train").setLevel(logging.ERROR)
    subsets = D.scan(case.path, caption_extension=".txt")
    items = [it for s in subsets for it in s.items]
    D.assign_buckets(items, (32, 32), enable=True, min_reso=16, max_reso=64, step=16, no_upscale=False)
    ds = D.TrainDataset(items, seed=0, captions=D.CaptionOptions(trigger_word="trig", shuffle=True, keep_tokens=1,
                                                                tag_dropout_rate=0.1), flip_aug=True, cache=None)
    for i in range(len(items)):
        ds[(i, 0, i)]
    D.describe(subsets)
    D.tag_frequency(subsets)


# -- prompt tags and infotext -------------------------------------------------------------------------

def _gen_infotext(rng: random.Random, ctx: Context) -> Case:
    parts = ["<lora:", "<lyco:", ">", ":", "0.5", "te=", "unet=", "dyn=", "1e999", "nan", "-", "a cat", ", ",
             "Negative prompt: ", "\n", "Steps: 20", ", Sampler: Euler", "Lora hashes: \"", "\"", "\\", "{", "}",
             "Seed: ", "x: \"unterminated", "x: \"ok\"", "\x1b[31m", "\u202e", "<", "::", "<lora:a:b:c:d:e>"]
    text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 25)))
    if rng.random() < 0.2:
        text = mutate_bytes(rng, text.encode()).decode("utf-8", "replace")
    return Case("text", text=text)


def _run_infotext(case: Case, ctx: Context) -> None:
    from . import prompt
    prompt.parse(case.text)
    from .pipeline import parse_infotext
    parse_infotext(case.text)


@dataclass
class Reader:
    name: str
    make: Callable[[random.Random, Context], Case]
    run: Callable[[Case, Context], None]
    what: str
    cases: int = 2000    # default CI-mode cases


READERS: dict[str, Reader] = {r.name: r for r in [
    Reader("safetensors", _gen_safetensors, _run_safetensors,
           "formats.safetensors_io.read_header/load_tensors, prompt.read_header_metadata"),
    Reader("kohya", _gen_kohya, _run_kohya, "lyco.load (kohya/LyCORIS, all algorithms) + inspect + attach"),
    Reader("peft", _gen_peft, _run_peft, "lyco.load / formats.peft.load (diffusers/PEFT) + inspect + attach"),
    Reader("legacy", _gen_legacy, _run_legacy, "lyco.load, load_legacy, open_checkpoint on .pt/.ckpt/.pth/.bin"),
    Reader("checkpoint", _gen_checkpoint, _run_checkpoint, "formats.checkpoint.open_checkpoint + tensor reads"),
    Reader("preset", _gen_preset, _run_preset, "presets.get(path.toml) + lyco.create"),
    Reader("train_config", _gen_train_config, _run_train_config, "train.config.load + check_runnable"),
    Reader("dataset", _gen_dataset, _run_dataset, "train.data.scan + buckets + captions + load_image"),
    Reader("infotext", _gen_infotext, _run_infotext, "prompt.parse + pipeline.parse_infotext"),
]}


# ==============================================================================================
# Running
# ==============================================================================================

def run(reader: str, cases: int, *, seed: int = 0, start: int = 0, timeout: float = DEFAULT_TIMEOUT,
        workdir: str | os.PathLike | None = None, corpus: Corpus | None = None,
        rss_growth_mb: float = DEFAULT_RSS_GROWTH_MB, crash_dir: str | None = None,
        stop_after: int | None = None, progress: bool = False) -> Report:
    """Run ``cases`` cases of one reader; every case ``i`` is a pure function of ``(seed, i)``."""
    from .errors import LycoError
    r = READERS[reader]
    own = workdir is None
    wd = Path(workdir or tempfile.mkdtemp(prefix=f"lyco-fuzz-{reader}-"))
    wd.mkdir(parents=True, exist_ok=True)
    ctx = Context(wd, corpus or Corpus.shared())
    rep = Report(reader, seed)
    t0 = time.time()
    base_rss = _rss_mb()
    try:
        for i in range(start, start + cases):
            rng = random.Random(f"{reader}:{seed}:{i}")
            try:
                case = r.make(rng, ctx)
            except Exception as e:  # a generator bug is a bug of the fuzzer: surface it
                raise RuntimeError(f"fuzz generator {reader} failed on case {i}: {e!r}") from e
            outcome, detail = "ok", ""
            before = _rss_mb()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with _time_limit(timeout):
                        r.run(case, ctx)
            except _Timeout:
                outcome, detail = "hang", f"ran past {timeout}s"
            except LycoError as e:
                outcome = f"error:{type(e).__name__}"
                why = check_message(e)
                if why:
                    outcome, detail = "unsafe-message", f"{type(e).__name__}: {why}"
            except _UnsafeOutput as e:
                outcome, detail = "unsafe-output", str(e)
            except MemoryError as e:
                outcome, detail = "memory", f"MemoryError {e}"
            except RecursionError as e:
                outcome, detail = "crash:RecursionError", _tb(e)
            except Exception as e:  # noqa: BLE001 — this is what the fuzzer is for
                outcome, detail = f"crash:{type(e).__name__}", _tb(e)
            grew = _rss_mb() - max(before, base_rss)
            if outcome == "ok" or outcome.startswith("error:"):
                if grew > rss_growth_mb:
                    outcome, detail = "memory", f"peak RSS grew by {grew:.0f} MB in one case"
            if case.marker and os.path.lexists(case.marker):
                outcome, detail = "code-executed", f"marker {case.marker} was created"
                with contextlib.suppress(OSError):
                    if os.path.isdir(case.marker):
                        os.rmdir(case.marker)
                    else:
                        os.unlink(case.marker)
            rep.cases += 1
            rep.add(outcome, case.kind.split("+")[0].split(":")[0] if case.kind else "?")
            if not (outcome == "ok" or outcome.startswith("error:")):
                f = Finding(reader, i, seed, outcome, detail, case.kind)
                if crash_dir and case.path:
                    dst = Path(crash_dir) / f"{reader}-s{seed}-c{i}{Path(case.path).suffix}"
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with contextlib.suppress(OSError):
                        if os.path.isdir(case.path):
                            shutil.copytree(case.path, dst, symlinks=True, dirs_exist_ok=True)
                        else:
                            shutil.copyfile(case.path, dst)
                        f.repro = str(dst)
                rep.findings.append(f)
                if stop_after and len(rep.findings) >= stop_after:
                    break
            if progress and (i - start + 1) % 500 == 0:
                print(f"  {reader}: {i - start + 1}/{cases} cases, {len(rep.findings)} finding(s), "
                      f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    finally:
        rep.seconds = time.time() - t0
        if own:
            shutil.rmtree(wd, ignore_errors=True)
    return rep


def _tb(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)[-4:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(e).__name__}: {str(e)[:300]} at {where}"


def cases_from_env(default: int) -> int:
    """``LYCO_FUZZ_CASES`` (long local mode) or ``default``."""
    v = os.environ.get("LYCO_FUZZ_CASES")
    return int(v) if v else default


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lyco.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--reader", default="all", help="a reader name or 'all' (see --list)")
    p.add_argument("--cases", type=int, default=None, help="cases per reader (default: LYCO_FUZZ_CASES or 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first case index (to reproduce one case)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per case")
    p.add_argument("--max-rss-growth-mb", type=float, default=DEFAULT_RSS_GROWTH_MB)
    p.add_argument("--crash-dir", help="copy every input that produced a finding here")
    p.add_argument("--json", metavar="FILE", help="write the reports as JSON")
    p.add_argument("--list", action="store_true")
    a = p.parse_args(argv)
    if a.list:
        for r in READERS.values():
            print(f"{r.name:14s} {r.what}")
        return 0
    import torch
    torch.set_num_threads(1)
    names = list(READERS) if a.reader == "all" else a.reader.split(",")
    for n in names:
        if n not in READERS:
            p.error(f"unknown reader {n!r}; one of {', '.join(READERS)}")
    cases = a.cases if a.cases is not None else cases_from_env(2000)
    reports = []
    bad = 0
    for n in names:
        rep = run(n, cases, seed=a.seed, start=a.start, timeout=a.timeout, rss_growth_mb=a.max_rss_growth_mb,
                  crash_dir=a.crash_dir, progress=True)
        print(rep.summary(), flush=True)
        reports.append(rep.to_json())
        bad += len(rep.findings)
    if a.json:
        Path(a.json).write_text(json.dumps(reports, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

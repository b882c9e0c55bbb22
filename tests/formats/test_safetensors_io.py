"""Safetensors I/O: header validation (hand-built hostile files), atomic writes, legacy pickles."""

from __future__ import annotations

import json
import os
import random
import struct

import pytest
import torch
from safetensors.torch import save_file

from lyco.errors import FormatError, LycoError, UnsafeFile
from lyco.formats.safetensors_io import (
    atomic_write, load, load_legacy, load_tensors, read_header, save_tensors,
)


def _raw_file(path, header: dict, data: bytes = b"", n_override: int | None = None, pad: bytes = b"") -> str:
    hb = json.dumps(header).encode() + pad
    n = len(hb) if n_override is None else n_override
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + hb + data)
    return str(path)


def _entry(dtype, shape, start, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


# --------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------


def test_roundtrip_dtypes_and_metadata(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.randn(5, generator=g).half(),
        "c": torch.randn(2, 2, generator=g).bfloat16(),
        "d": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e": torch.tensor([True, False]),
        "f": torch.tensor(2.5),  # 0-d, like alpha
        "g": torch.zeros(0, 3),  # empty
    }
    meta = {"ss_network_dim": "4", "note": "héllo\nworld"}
    p = tmp_path / "x.safetensors"
    save_tensors(tensors, p, meta)
    h = read_header(p)
    assert h.metadata == meta
    assert {k: v.shape for k, v in h.tensors.items()} == {k: tuple(v.shape) for k, v in tensors.items()}
    out, m2 = load_tensors(p)
    assert m2 == meta
    assert set(out) == set(tensors)
    for k in tensors:
        assert out[k].dtype == tensors[k].dtype
        assert torch.equal(out[k], tensors[k])


def test_save_views_and_shared_storage(tmp_path):
    base = torch.randn(6, 4)
    tensors = {"view": base[:3], "t": base.t(), "same": base, "same2": base}
    p = tmp_path / "v.safetensors"
    save_tensors(tensors, p)
    out, _ = load_tensors(p)
    for k, v in tensors.items():
        assert torch.equal(out[k], v)


def test_save_rejects_non_string_metadata(tmp_path):
    p = tmp_path / "m.safetensors"
    with pytest.raises(FormatError, match="ss_network_dim"):
        save_tensors({"a": torch.zeros(1)}, p, {"ss_network_dim": 4})
    assert not p.exists()
    with pytest.raises(FormatError):
        save_tensors({"a": [1, 2]}, p)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------


def test_refuses_to_overwrite_unless_asked(tmp_path):
    p = tmp_path / "o.safetensors"
    save_tensors({"a": torch.ones(2)}, p)
    with pytest.raises(LycoError, match="already exists"):
        save_tensors({"a": torch.zeros(2)}, p)
    assert torch.equal(load_tensors(p)[0]["a"], torch.ones(2))
    save_tensors({"a": torch.zeros(2)}, p, overwrite=True)
    assert torch.equal(load_tensors(p)[0]["a"], torch.zeros(2))
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors"]


def test_exception_inside_atomic_write_keeps_old_file_and_no_temp(tmp_path):
    p = tmp_path / "keep.bin"
    p.write_bytes(b"old content")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(p, overwrite=True) as f:
            f.write(b"new partial data")
            raise RuntimeError("boom")
    assert p.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["keep.bin"]
    # a new file that fails is not created at all
    q = tmp_path / "new.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(q) as f:
            f.write(b"x")
            raise KeyboardInterrupt
    assert not q.exists()
    assert os.listdir(tmp_path) == ["keep.bin"]


def test_atomic_write_success_and_permissions(tmp_path):
    p = tmp_path / "ok.bin"
    with atomic_write(p) as f:
        f.write(b"abc")
        assert os.path.dirname(f.name) == str(tmp_path)
    assert p.read_bytes() == b"abc"
    mask = os.umask(0)
    os.umask(mask)
    assert (os.stat(p).st_mode & 0o777) == (0o666 & ~mask)
    assert os.listdir(tmp_path) == ["ok.bin"]


def test_atomic_write_refuses_directory(tmp_path):
    with pytest.raises(LycoError, match="directory"):
        with atomic_write(tmp_path, overwrite=True):
            pass


# --------------------------------------------------------------------------------------
# header validation
# --------------------------------------------------------------------------------------

F32_8 = b"\x00" * 8


@pytest.mark.parametrize("case", [
    "empty", "short", "zero_len", "len_past_end", "len_over_limit", "bad_json", "json_list", "bad_utf8",
    "bad_dtype", "negative_shape", "huge_shape", "float_shape", "bool_shape", "offsets_past_end",
    "overlap", "gap", "trailing", "size_mismatch", "start_after_end", "meta_not_str", "meta_not_dict",
    "duplicate_key", "missing_field", "extra_field", "offsets_not_pair", "entry_not_dict",
    "truncated_data", "deep_nesting",
])
def test_bad_headers_raise_format_error(tmp_path, case):
    p = tmp_path / f"{case}.safetensors"
    if case == "empty":
        p.write_bytes(b"")
    elif case == "short":
        p.write_bytes(b"abc")
    elif case == "zero_len":
        p.write_bytes(struct.pack("<Q", 0) + b"{}")
    elif case == "len_past_end":
        _raw_file(p, {"a": _entry("F32", [2], 0, 8)}, F32_8, n_override=10_000)
    elif case == "len_over_limit":
        _raw_file(p, {}, b"", n_override=2 ** 62)
    elif case == "bad_json":
        p.write_bytes(struct.pack("<Q", 5) + b"{abc}")
    elif case == "json_list":
        p.write_bytes(struct.pack("<Q", 2) + b"[]")
    elif case == "bad_utf8":
        p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    elif case == "bad_dtype":
        _raw_file(p, {"a": _entry("F7", [2], 0, 8)}, F32_8)
    elif case == "negative_shape":
        _raw_file(p, {"a": _entry("F32", [-2, -1], 0, 8)}, F32_8)
    elif case == "huge_shape":
        _raw_file(p, {"a": _entry("F32", [2 ** 40, 2 ** 40], 0, 8)}, F32_8)
    elif case == "float_shape":
        _raw_file(p, {"a": _entry("F32", [2.0], 0, 8)}, F32_8)
    elif case == "bool_shape":
        _raw_file(p, {"a": _entry("F32", [True, 2], 0, 8)}, F32_8)
    elif case == "offsets_past_end":
        _raw_file(p, {"a": _entry("F32", [4], 0, 16)}, F32_8)
    elif case == "overlap":
        _raw_file(p, {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, b"\x00" * 12)
    elif case == "gap":
        _raw_file(p, {"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)}, b"\x00" * 12)
    elif case == "trailing":
        _raw_file(p, {"a": _entry("F32", [2], 0, 8)}, F32_8 + b"junk")
    elif case == "size_mismatch":
        _raw_file(p, {"a": _entry("F32", [3], 0, 8)}, F32_8)
    elif case == "start_after_end":
        _raw_file(p, {"a": _entry("F32", [0], 8, 0)}, F32_8)
    elif case == "meta_not_str":
        _raw_file(p, {"__metadata__": {"ss_x": 4}, "a": _entry("F32", [2], 0, 8)}, F32_8)
    elif case == "meta_not_dict":
        _raw_file(p, {"__metadata__": ["x"], "a": _entry("F32", [2], 0, 8)}, F32_8)
    elif case == "duplicate_key":
        hb = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' \
             b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
        p.write_bytes(struct.pack("<Q", len(hb)) + hb + F32_8)
    elif case == "missing_field":
        _raw_file(p, {"a": {"dtype": "F32", "shape": [2]}}, F32_8)
    elif case == "extra_field":
        _raw_file(p, {"a": {**_entry("F32", [2], 0, 8), "evil": 1}}, F32_8)
    elif case == "offsets_not_pair":
        _raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, F32_8)
    elif case == "entry_not_dict":
        _raw_file(p, {"a": "F32"}, F32_8)
    elif case == "deep_nesting":
        hb = b"[" * 200_000 + b"]" * 200_000
        p.write_bytes(struct.pack("<Q", len(hb)) + hb)
    elif case == "truncated_data":
        good = tmp_path / "good.safetensors"
        save_file({"a": torch.randn(10), "b": torch.randn(3)}, str(good))
        p.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(FormatError) as ei:
        read_header(p)
    assert str(p) in str(ei.value)
    with pytest.raises(FormatError):
        load_tensors(p)


def test_header_size_limit_is_configurable(tmp_path):
    p = tmp_path / "big.safetensors"
    _raw_file(p, {"a": _entry("F32", [2], 0, 8)}, F32_8, pad=b" " * 4096)
    assert read_header(p).tensors["a"].shape == (2,)  # safetensors pads headers with spaces
    with pytest.raises(FormatError, match="exceeds the limit"):
        read_header(p, max_header=1024)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(FormatError):
        read_header(tmp_path)


def test_mutated_files_never_raise_raw_exceptions(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(4, 3), "alpha": torch.tensor(1.0), "i": torch.arange(3)}, str(good),
              metadata={"k": "v"})
    raw = good.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    rng = random.Random(1234)
    outcomes = {"ok": 0, "bad": 0}
    for i in range(300):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(0, 8 + n)  # corrupt the length or the header
            b[pos] = rng.randrange(256)
        if rng.random() < 0.2:
            b = b[: rng.randrange(len(b))]
        p = tmp_path / f"m{i}.safetensors"
        p.write_bytes(bytes(b))
        try:
            load_tensors(p)
            outcomes["ok"] += 1
        except FormatError:
            outcomes["bad"] += 1
        p.unlink()
    assert outcomes["bad"] > 100


# --------------------------------------------------------------------------------------
# legacy pickles
# --------------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_load_legacy_plain_and_wrapped(tmp_path):
    t = {"lora_unet_x.lora_down.weight": torch.randn(2, 3), "lora_unet_x.alpha": torch.tensor(2.0)}
    p = tmp_path / "a.pt"
    torch.save(t, p)
    out = load_legacy(p)
    assert set(out) == set(t)
    assert all(torch.equal(out[k], t[k]) for k in t)
    q = tmp_path / "b.ckpt"
    torch.save({"state_dict": t, "global_step": 7}, q)
    out2, meta = load(q)
    assert meta == {} and set(out2) == set(t)


def test_load_legacy_refuses_code_execution(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1), "payload": _Evil()}, p)
    with pytest.raises(UnsafeFile, match="code execution") as ei:
        load_legacy(p)
    assert str(p) in str(ei.value)


def test_load_legacy_garbage_is_format_error(tmp_path):
    p = tmp_path / "junk.bin"
    p.write_bytes(b"\x00not a torch file at all" * 10)
    with pytest.raises(FormatError):
        load_legacy(p)
    with pytest.raises(FormatError):
        load_legacy(tmp_path / "missing.pt")

"""Metadata is data: header strings are shown escaped and length-limited by ``lyco inspect`` (text
and JSON), error messages quoting keys from files are terminal-safe and bounded, and nothing in a
header is ever evaluated."""

from __future__ import annotations

import json
import os

import pytest
import torch

import lyco
from lyco import cli
from lyco.errors import FormatError, LycoError, clean_text
from lyco.formats.metadata import safe_display
from lyco.formats.safetensors_io import save_tensors
from lyco.fuzz import unsafe_chars

from _reliability_common import bad_input

HOSTILE = {
    "ansi": "\x1b[2J\x1b[31mred\x1b[0m",
    "osc-title": "\x1b]0;pwned\x07",
    "csi-8bit": "\x9b31m",
    "bidi": "safe\u202etxt.exe\u202c",
    "zero-width": "a\u200b\u200d\ufeffb",
    "nul-bs-cr": "a\x00b\x08\x08\rX",
    "line-separators": "a\u2028b\u2029c",
    "huge": "y" * 1_000_000,
    "code": "__import__('os').system('touch PWNED')",
    "json-ish": '{"ss_network_dim": "__import__(\\"os\\")"}',
}


def _file(tmp_path, meta, key="lora_unet_x"):
    p = tmp_path / "meta.safetensors"
    save_tensors({f"{key}.lora_down.weight": torch.ones(2, 3), f"{key}.lora_up.weight": torch.ones(4, 2)}, p,
                 meta, overwrite=True)
    return p


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_inspect_escapes_and_limits_metadata(tmp_path, capsys, kind):
    v = HOSTILE[kind]
    meta = {"ss_output_name": v, f"k_{kind}{v[:50]}": v, "ss_tag_frequency": json.dumps({v[:100]: {v[:100]: 1}}),
            "lyco_train_config": v}
    p = _file(tmp_path, meta)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert cli.main(["inspect", str(p)]) == 0
        text = capsys.readouterr().out
        assert cli.main(["inspect", str(p), "--json"]) == 0
        js = capsys.readouterr().out
    finally:
        os.chdir(cwd)
    assert not unsafe_chars(text), [hex(ord(c)) for c in unsafe_chars(text)][:5]
    assert max(len(line) for line in text.splitlines()) < 1000
    assert len(text) < 20_000
    assert not unsafe_chars(js)  # JSON escapes control characters itself
    assert json.loads(js)["metadata"]["ss_output_name"] == v  # data kept exact in machine output
    assert not (tmp_path / "PWNED").exists()
    bad_input("hostile metadata string", f"{kind}: shown escaped/limited by lyco inspect")


def test_safe_display_properties():
    for v in HOSTILE.values():
        s = safe_display(v, 120)
        assert not unsafe_chars(s, allow="")
        assert len(s) <= 140
    assert safe_display("plain text, ü ok") == "plain text, ü ok"


@pytest.mark.parametrize("kind", ["ansi", "osc-title", "bidi", "huge", "nul-bs-cr"])
def test_error_messages_quoting_file_content_are_safe(tmp_path, kind):
    v = HOSTILE[kind]
    p = tmp_path / "bad.safetensors"
    save_tensors({f"lora_unet_{v}.hada_w1_a": torch.ones(2, 2), f"weird{v}.x": torch.ones(1)}, p)
    with pytest.raises(LycoError) as ei:
        lyco.load(p)
    msg = str(ei.value)
    assert not unsafe_chars(msg) and len(msg) <= 4100, msg[:300]
    e = FormatError("found " + v, file="f", key=v)
    assert not unsafe_chars(str(e)) and len(str(e)) <= 4100
    bad_input("hostile key name in a file", f"{kind}: error message escaped and bounded")


def test_clean_text_keeps_newlines_and_plain_text():
    assert clean_text("a\nb") == "a\nb"
    assert clean_text("x\x1by") == "x\\x1by"
    assert clean_text("é" * 10) == "é" * 10

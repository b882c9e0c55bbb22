"""Legacy pickles that would run code are refused with ``UnsafeFile`` at every entry point that
takes a ``.pt``/``.ckpt``/``.pth``/``.bin``; the code never runs (a marker file never appears), and
the message tells how to convert a trusted file. The pickles are *written* with ``torch.save`` /
``pickle.dumps`` (which run nothing); nothing here unpickles them except lyco's readers under test."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import lyco
from lyco import cli, fuzz
from lyco.errors import UnsafeFile
from lyco.formats import peft, safetensors_io
from lyco.formats.checkpoint import open_checkpoint

from _reliability_common import bad_input

PAYLOADS = ["os.mkdir", "os.system", "builtins.exec", "builtins.eval", "subprocess.call", "builtins.open",
            "shutil.copy"]
SUFFIXES = [".pt", ".ckpt", ".pth", ".bin"]


def _evil_file(folder, name, suffix, payload, *, zip_format=True, wrap="dict"):
    marker = str(folder / f"MARKER-{name}")
    obj = dict(fuzz.evil_payloads(marker))[payload]
    inner = {"lora_unet_x.lora_down.weight": torch.ones(2, 2), "evil": obj} if wrap == "dict" else \
        {"state_dict": {"model.diffusion_model.out.2.weight": torch.ones(1), "x": obj}} if wrap == "ckpt" else obj
    p = folder / f"{name}{suffix}"
    if zip_format is None:  # a bare pickle stream (pre-1.6 style, no torch framing)
        p.write_bytes(pickle.dumps(inner, protocol=2))
    else:
        torch.save(inner, p, _use_new_zipfile_serialization=zip_format)
    return p, marker


def _entry_points(tmp_path):
    """(name, callable(path)) for every API entry point that reads a legacy pickle."""
    from lyco import tools
    good = tmp_path / "good.safetensors"
    if not good.exists():
        safetensors_io.save_tensors({"lora_unet_x.lora_down.weight": torch.ones(2, 2),
                                     "lora_unet_x.lora_up.weight": torch.ones(2, 2)}, good)
    out = lambda n: str(tmp_path / f"out-{n}.safetensors")  # noqa: E731
    return [
        ("lyco.load", lambda p: lyco.load(p)),
        ("lyco.load(check_finite=False)", lambda p: lyco.load(p, check_finite=False)),
        ("safetensors_io.load", lambda p: safetensors_io.load(p)),
        ("safetensors_io.load_legacy", lambda p: safetensors_io.load_legacy(p)),
        ("peft.load", lambda p: peft.load(p)),
        ("open_checkpoint", lambda p: open_checkpoint(p).close()),
        ("tools.inspect", lambda p: tools.inspect(p)),
        ("tools.convert", lambda p: tools.convert(p, out("convert"), overwrite=True)),
        ("tools.resize", lambda p: tools.resize(p, out("resize"), rank=1, overwrite=True)),
        ("tools.combine", lambda p: tools.combine([str(good), str(p)], out("combine"), overwrite=True)),
        ("tools.merge(base)", lambda p: tools.merge(str(p), [str(good)], out("merge"), overwrite=True)),
        ("tools.extract(base)", lambda p: tools.extract(str(p), str(p), out("extract"), rank=1, overwrite=True)),
        ("cli inspect", lambda p: _cli(["inspect", str(p)])),
        ("cli convert", lambda p: _cli(["convert", str(p), "-o", out("cli-convert"), "--overwrite"])),
        ("cli merge", lambda p: _cli(["merge", str(p), str(good), "-o", out("cli-merge"), "--overwrite"])),
    ]


class _CliExit(Exception):
    pass


def _cli(argv):
    rc = cli.main(argv)
    if rc == 2:
        raise _CliExit(rc)
    return rc


@pytest.mark.parametrize("payload", PAYLOADS)
def test_code_pickles_refused_everywhere(tmp_path, payload, capsys):
    for i, suffix in enumerate(SUFFIXES):
        zip_format = [True, False, None, True][i]
        wrap = ["dict", "ckpt", "bare", "dict"][i]
        p, marker = _evil_file(tmp_path, f"evil{i}", suffix, payload, zip_format=zip_format, wrap=wrap)
        for name, fn in _entry_points(tmp_path):
            try:
                fn(p)
            except UnsafeFile as e:
                msg = str(e)
                assert "safetensors" in msg and str(p) in msg, (name, msg)
                assert "--trust-pickle" not in msg  # the convert verb has no such option
                bad_input("pickle-runs-code", f"refused (UnsafeFile) by {name}")
            except _CliExit:
                err = capsys.readouterr().err
                assert "refusing to load" in err and "safetensors" in err, (name, err)
                bad_input("pickle-runs-code", f"refused (exit 2) by {name}")
            else:
                pytest.fail(f"{name} accepted a pickle that calls {payload} ({p.name})")
            assert not os.path.lexists(marker), f"{name} ran the pickled {payload} call"


def test_plain_tensor_pickles_still_load(tmp_path):
    """weights_only reading keeps working for honest legacy files."""
    p = tmp_path / "plain.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(4, 2),
                "lora_unet_x.alpha": torch.tensor(2.0)}, p)
    a = lyco.load(p)
    assert list(a.modules) == ["unet.x"] and a.modules["unet.x"].algo == "lora"


def test_unsafe_message_offers_conversion(tmp_path):
    p, marker = _evil_file(tmp_path, "m", ".ckpt", "os.system")
    for fn in (lambda: lyco.load(p), lambda: open_checkpoint(p)):
        with pytest.raises(UnsafeFile) as ei:
            fn()
        msg = str(ei.value)
        assert "code" in msg and "safetensors" in msg and ("trust" in msg or "Convert" in msg), msg
    assert not os.path.lexists(marker)

"""Nothing lost: every output appears whole or not at all.

* SIGKILL at random moments while a large adapter / single-file checkpoint is being rewritten
  (a forked writer alternates two versions): the file on disk always loads and equals the complete
  old or the complete new version; the only leftovers are hidden ``.<name>.*.tmp`` files, which no
  reader takes for an output.
* Disk full (a 1 MiB tmpfs) and a read-only file system: a :class:`~lyco.errors.WriteError` naming
  the path, no partial file, an older file untouched.
* CLI verbs: an output that is (or links to) an input is refused, an existing output needs
  ``--overwrite``, inputs are never modified.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch

import lyco
from lyco import cli
from lyco.adapter import Adapter, ModuleAdapter
from lyco.errors import LycoError, WriteError
from lyco.formats import checkpoint, kohya, peft, safetensors_io
from lyco.formats.safetensors_io import load_tensors

from _reliability_common import bad_input, record

KILL_SEEDS = [0, 1, 2, 3, 4, 5]


def _big_adapter(value: float, n_modules=6, out=1024, inn=1024, rank=64) -> Adapter:
    g = torch.Generator().manual_seed(int(value * 1000))
    mods = {}
    for i in range(n_modules):
        mods[f"model.layer{i}"] = ModuleAdapter("lora", {
            "lora_down.weight": torch.randn(rank, inn, generator=g) + value,
            "lora_up.weight": torch.randn(out, rank, generator=g) + value,
            "alpha": torch.tensor(float(rank))})
    return Adapter(mods, {"ss_output_name": f"v{value}"}, None, None)


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fork_loop(write_a, write_b):
    """A forked child that rewrites the file forever (A, B, A, …); returns its pid."""
    pid = os.fork()
    if pid == 0:  # child: only file writing, then _exit (never returns into pytest)
        try:
            i = 0
            while True:
                (write_b if i % 2 == 0 else write_a)()
                i += 1
        finally:
            os._exit(0)
    return pid


def _kill_run(tmp_path, name, write_a, write_b, read_digest, digests, seed):
    rng = random.Random(seed)
    target = tmp_path / name
    write_a()
    assert read_digest(target) == digests["A"]
    pid = _fork_loop(write_a, write_b)
    time.sleep(rng.uniform(0.2, 2.5))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    got = read_digest(target)  # must load: complete old or complete new
    assert got in (digests["A"], digests["B"]), f"seed {seed}: the file is neither version"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != name)
    for n in leftovers:
        assert n.startswith(f".{name}.") and n.endswith(".tmp"), f"stray file {n!r} next to the output"
    # none of them is taken for an output: hidden, not an adapter suffix, not indexed for <lora:…>
    from lyco.prompt import AdapterIndex
    assert [f.path.name for f in AdapterIndex([tmp_path]).files] == [name]
    for n in leftovers:
        assert not n.endswith((".safetensors", ".pt", ".ckpt", ".pth", ".bin"))
        (tmp_path / n).unlink()
    return "A" if got == digests["A"] else "B", bool(leftovers)


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_sigkill_during_adapter_save(tmp_path, seed):
    a, b = _big_adapter(0.0), _big_adapter(1.0)
    digests = {"A": _digest(kohya.to_state_dict(a)), "B": _digest(kohya.to_state_dict(b))}
    path = tmp_path / "adapter.safetensors"
    got, interrupted = _kill_run(tmp_path, path.name, lambda: a.save(path, overwrite=True),
                                 lambda: b.save(path, overwrite=True),
                                 lambda p: _digest(load_tensors(p)[0]), digests, seed)
    assert lyco.load(path).metadata["ss_output_name"] == ("v0.0" if got == "A" else "v1.0")
    _count_kill("adapter save (Adapter.save → atomic_write)", got, interrupted)


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_sigkill_during_single_file_write(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    ta = {f"model.diffusion_model.t{i}": torch.randn(1024, 1024, generator=g) for i in range(6)}
    tb = {k: v + 1 for k, v in ta.items()}
    digests = {"A": _digest(ta), "B": _digest(tb)}
    path = tmp_path / "base.safetensors"
    got, interrupted = _kill_run(tmp_path, path.name, lambda: checkpoint.write_single_file(ta, path),
                                 lambda: checkpoint.write_single_file(iter(tb.items()), path),
                                 lambda p: _digest(load_tensors(p)[0]), digests, seed)
    _count_kill("single-file checkpoint (checkpoint.write_single_file)", got, interrupted)


_KILLS: dict[str, dict[str, int]] = {}


def _count_kill(what, got, interrupted):
    d = _KILLS.setdefault(what, {"kills": 0, "old_version_found": 0, "new_version_found": 0,
                                 "temp_file_left_by_the_kill": 0})
    d["kills"] += 1
    d["old_version_found" if got == "A" else "new_version_found"] += 1
    d["temp_file_left_by_the_kill"] += int(interrupted)
    record("kills", what, dict(d))


# ----------------------------------------------------------------------------- full / read-only disks

@contextlib.contextmanager
def _small_fs(path: Path, size="1m", ro=False):
    """A tmpfs of ``size`` at ``path`` (root), read-only when ``ro``; yields True when mounted."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    try:
        yield r.returncode == 0
    finally:
        if r.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _writers(folder: Path):
    big = _big_adapter(2.0, n_modules=2, out=512, inn=512, rank=256)  # 1 MiB per module
    lora = _big_adapter(3.0, n_modules=2, out=512, inn=512, rank=256)
    tensors = {f"model.diffusion_model.t{i}": torch.ones(256, 1024) for i in range(2)}
    return {
        "Adapter.save": lambda p: big.save(p, overwrite=True),
        "safetensors_io.save_tensors": lambda p: safetensors_io.save_tensors(tensors, p, overwrite=True),
        "checkpoint.write_single_file": lambda p: checkpoint.write_single_file(tensors, p),
        "peft.save": lambda p: peft.save(Adapter({"unet.down_blocks.0.x": lora.modules["model.layer0"],
                                                 "unet.down_blocks.0.y": lora.modules["model.layer1"]}), p,
                                       overwrite=True),
        "atomic_write": lambda p: _atomic(p, b"x" * (3 << 20)),
    }


def _atomic(p, data):
    with safetensors_io.atomic_write(p, overwrite=True) as f:
        f.write(data)


def _fake_full(monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync)


def test_disk_full_reports_path_and_leaves_nothing(tmp_path, monkeypatch):
    mnt = tmp_path / "full"
    with _small_fs(mnt, "1m") as mounted:
        if not mounted:  # no mount permission: a full disk as a failing fsync
            _fake_full(monkeypatch)
        old = mnt / "old.safetensors"
        safetensors_io.save_tensors({"w": torch.ones(4)}, old)  # small: fits
        old_bytes = old.read_bytes()
        for name, write in _writers(mnt).items():
            for target in (mnt / f"new-{name}.safetensors", old):
                with pytest.raises(WriteError) as ei:
                    write(target)
                e = ei.value
                assert str(target) in str(e) and "No space" in str(e), str(e)
                assert isinstance(e, OSError) and e.errno == errno.ENOSPC
                assert sorted(p.name for p in mnt.iterdir()) == ["old.safetensors"], name
                assert old.read_bytes() == old_bytes
                bad_input("disk full while writing", f"{name}: WriteError naming the path, nothing left")
        monkeypatch.undo()


def test_read_only_folder_reports_path(tmp_path, monkeypatch):
    mnt = tmp_path / "ro"
    with _small_fs(mnt, "1m", ro=True) as mounted:
        if not mounted:
            import tempfile

            def deny(*a, **kw):
                raise PermissionError(errno.EACCES, "Permission denied")
            monkeypatch.setattr(tempfile, "mkstemp", deny)
        for name, write in _writers(mnt).items():
            target = mnt / f"{name}.safetensors"
            with pytest.raises(WriteError) as ei:
                write(target)
            assert str(target) in str(ei.value) and ei.value.errno in (errno.EROFS, errno.EACCES), str(ei.value)
            assert list(mnt.iterdir()) == []
            bad_input("read-only / no-permission output folder", f"{name}: WriteError naming the path")
        monkeypatch.undo()


def test_trainer_text_writer_is_atomic(tmp_path, monkeypatch):
    """The trainer's JSON writer (loss curves, state.json) goes through atomic_write too."""
    from lyco.train.loop import _atomic_text
    p = tmp_path / "loss.json"
    _atomic_text(str(p), "old")
    _fake_full(monkeypatch)
    with pytest.raises(WriteError):
        _atomic_text(str(p), "new" * 1000)
    monkeypatch.undo()
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["loss.json"]


# ----------------------------------------------------------------------------- CLI output rules

def _sha(p: Path) -> str:
    if p.is_dir():
        return hashlib.sha256(b"".join(_sha(x).encode() for x in sorted(p.rglob("*")) if x.is_file())).hexdigest()
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("cli")
    comps = corpus.sd_target("sd1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, algo in (("lora", "lora"), ("loha", "loha")):
            net = lyco.create(comps, algo=algo, rank=2, preset="attn-only", seed=0)
            for layer in net.layers.values():  # non-zero ΔW
                for prm in layer.parameters():
                    prm.data.add_(0.01)
            net.save(d / f"{name}.safetensors")
            net.detach()
    base = corpus.workdir / "tiny-sd1.safetensors"
    corpus.single_file()
    tuned = d / "tuned.safetensors"
    ents, meta = corpus.single_file()
    from lyco.fuzz import Entry, st_bytes
    tuned.write_bytes(st_bytes([Entry(e.name, e.dtype, e.shape, bytes((b + 1) % 256 for b in e.data[:64]) + e.data[64:])
                                for e in ents], meta))
    return {"lora": d / "lora.safetensors", "loha": d / "loha.safetensors", "base": base, "tuned": tuned, "dir": d}


def _verbs(i):
    L, H, B, T = str(i["lora"]), str(i["loha"]), str(i["base"]), str(i["tuned"])
    return {
        "convert": ([L], lambda out: ["convert", L, "-o", out, "--quiet"]),
        "resize": ([L], lambda out: ["resize", L, "-o", out, "--rank", "1", "--quiet"]),
        "combine": ([L, H], lambda out: ["combine", L, f"{H}:0.5", "-o", out, "--quiet"]),
        "merge": ([B, L], lambda out: ["merge", B, L, "-o", out, "--quiet"]),
        "extract": ([B, T], lambda out: ["extract", B, T, "-o", out, "--rank", "2", "--quiet", "--device", "cpu"]),
    }


@pytest.mark.parametrize("verb", ["convert", "resize", "combine", "merge", "extract"])
def test_cli_output_rules(cli_inputs, tmp_path, verb, capsys):
    inputs, argv = _verbs(cli_inputs)[verb]
    before = {p: _sha(Path(p)) for p in inputs}
    # 1. the output is an input, or a symlink/hard link to one: refused
    link = tmp_path / "link.safetensors"
    link.symlink_to(inputs[-1])
    hard = tmp_path / "hard.safetensors"
    os.link(inputs[-1], hard)
    for out in (inputs[0], inputs[-1], str(link), str(hard)):
        for extra in ([], ["--overwrite"]):
            assert cli.main(argv(out) + extra) == 2, (verb, out, extra)
            err = capsys.readouterr().err
            assert "input" in err, err
    bad_input("output path resolving to an input", f"lyco {verb}: refused (exit 2), input untouched")
    # 2. a fresh output works; running again needs --overwrite
    out = tmp_path / "out.safetensors"
    assert cli.main(argv(str(out))) == 0, capsys.readouterr().err
    first = _sha(out)
    assert cli.main(argv(str(out))) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _sha(out) == first
    assert cli.main(argv(str(out)) + ["--overwrite"]) == 0
    bad_input("existing output without --overwrite", f"lyco {verb}: refused (exit 2), file unchanged")
    # 3. inputs never modified, and no stray files next to the output
    assert {p: _sha(Path(p)) for p in inputs} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.safetensors", "link.safetensors", "out.safetensors"]
    capsys.readouterr()

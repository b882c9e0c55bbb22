"""NaN/Inf: refused by default naming module and tensor, readable with ``check_finite=False``;
a NaN loss stops training with the last good checkpoint kept."""

from __future__ import annotations

import math
import struct

import pytest
import torch

import lyco
from lyco.errors import FormatError
from lyco.formats import peft
from lyco.formats.safetensors_io import load_tensors, save_tensors
from lyco.fuzz import Entry, st_bytes

from _reliability_common import bad_input

BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf")}


def _poison(e: Entry, value: float) -> Entry:
    assert e.dtype == "F32"
    b = bytearray(e.data)
    b[0:4] = struct.pack("<f", value)
    return Entry(e.name, e.dtype, e.shape, bytes(b))


def _module_with_float(groups):
    for mod in sorted(groups):
        es = groups[mod]
        if any(e.dtype == "F32" and not e.name.endswith((".alpha", ".on_input")) and e.data for e in es):
            return mod, es
    raise AssertionError("no module with a float tensor")


@pytest.mark.parametrize("kind", list(BAD))
def test_nonfinite_tensor_refused_for_every_algorithm(corpus, tmp_path, kind):
    for name, (groups, meta) in sorted(corpus.adapters().items()):
        mod, es = _module_with_float(groups)
        target = next(e for e in es if e.dtype == "F32" and not e.name.endswith((".alpha", ".on_input")) and e.data)
        entries = [_poison(e, BAD[kind]) if e is target else e for e in es]
        p = tmp_path / f"{name}-{kind}.safetensors"
        p.write_bytes(st_bytes(entries, meta))
        with pytest.raises(FormatError) as ei:
            lyco.load(p)
        msg = str(ei.value)
        suffix = target.name.partition(".")[2]
        assert repr(suffix) in msg and "NaN or Inf" in msg and str(p) in msg, msg
        assert "module " in msg
        bad_input(f"{kind} in adapter tensor", "refused (FormatError naming module and tensor)")
        a = lyco.load(p, check_finite=False)  # readable on request
        (m,) = a.modules.values()
        t = m.tensors[suffix]
        assert not bool(torch.isfinite(t).all())
        bad_input(f"{kind} in adapter tensor", "read with check_finite=False")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_alpha_of_a_lora_is_refused(tmp_path, value):
    p = tmp_path / "a.safetensors"
    save_tensors({"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(4, 2),
                  "lora_unet_x.alpha": torch.tensor(value)}, p)
    with pytest.raises(FormatError, match="alpha"):
        lyco.load(p)
    bad_input("non-finite alpha (LoRA)", "refused (FormatError)")
    lyco.load(p, check_finite=False)


def test_inf_alpha_is_accepted_where_it_is_ignored(tmp_path):
    """A LoKr with two full factors ignores alpha (scale 1): an inf alpha there is harmless."""
    p = tmp_path / "lokr.safetensors"
    save_tensors({"lora_unet_x.lokr_w1": torch.ones(2, 2), "lora_unet_x.lokr_w2": torch.ones(3, 2),
                  "lora_unet_x.alpha": torch.tensor(float("inf"))}, p)
    a = lyco.load(p)
    m = a.modules["unet.x"]
    assert math.isfinite(m.algorithm.scale(m.tensors))


def test_fp8_adapter_is_checked_not_crashed(tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.fail("this torch lacks float8_e4m3fn")
    p = tmp_path / "fp8.safetensors"
    down = torch.ones(2, 3).to(torch.float8_e4m3fn)
    save_tensors({"lora_unet_x.lora_down.weight": down, "lora_unet_x.lora_up.weight": torch.ones(4, 2)}, p)
    assert lyco.load(p).modules["unet.x"].tensors["lora_down.weight"].dtype == torch.float8_e4m3fn
    bad = torch.full((2, 3), float("nan")).to(torch.float8_e4m3fn)
    save_tensors({"lora_unet_x.lora_down.weight": bad, "lora_unet_x.lora_up.weight": torch.ones(4, 2)}, p,
                 overwrite=True)
    with pytest.raises(FormatError, match="NaN or Inf"):
        lyco.load(p)


def test_nonfinite_peft_file_refused(corpus, tmp_path):
    entries, meta = corpus.peft_files()[0]
    entries = list(entries)
    i = next(i for i, e in enumerate(entries) if e.name.endswith("lora_B.weight"))
    entries[i] = _poison(entries[i], float("nan"))
    p = tmp_path / "peft.safetensors"
    p.write_bytes(st_bytes(entries, meta))
    with pytest.raises(FormatError, match="lora_up.weight"):
        lyco.load(p)
    lyco.load(p, check_finite=False)
    peft.load(p)  # the low-level decoder itself does not judge values


# ----------------------------------------------------------------------------- trainer

def test_nan_loss_stops_training_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    from lyco.train import from_dict
    from lyco.train.loop import Trainer, TrainingError
    from lyco.train.synthetic import make_shapes

    data = tmp_path / "data"
    make_shapes(data / "2_shape", 4, seed=3, sizes=((32, 32),))
    out = tmp_path / "out"
    cfg = from_dict({
        "model": {"path": "tiny:sd1"},
        "data": {"train_dir": str(data), "resolution": [32, 32], "bucket_reso_steps": 32, "min_bucket_reso": 32,
                 "max_bucket_reso": 64, "cache_dir": str(out / "cache")},
        "network": {"algo": "lora", "rank": 2},
        "optimizer": {"learning_rate": 1e-3},
        "train": {"max_train_steps": 6, "batch_size": 2},
        "output": {"output_dir": str(out), "progress_bar": False, "log_with": "none", "save_dtype": "fp32",
                   "save_every_n_steps": 1, "save_state": False},
        "eval": {"enabled": False},
    })
    real = Trainer.compute_loss
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        loss = real(self, *a, **kw)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] >= 4 else loss  # the 4th step's loss is NaN

    monkeypatch.setattr(Trainer, "compute_loss", poisoned)
    tr = Trainer(cfg)
    with pytest.raises(TrainingError) as ei:
        tr.train()
    msg = str(ei.value)
    assert "NaN" in msg and "last good checkpoint" in msg, msg
    last = out / "last-step00000003.safetensors"
    kept = sorted(p.name for p in out.glob("*.safetensors"))
    assert kept and all("step0000000" in k for k in kept), kept   # no final adapter from a NaN state
    newest = out / sorted(kept)[-1]
    assert "step00000003" in newest.name, kept
    assert str(newest) in msg or newest.name in msg, msg
    tensors, _ = load_tensors(newest)
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
    a = lyco.load(newest)  # loads with the default NaN check
    assert len(a.modules) > 0
    del last
    bad_input("NaN training loss", "stopped (TrainingError), last good checkpoint kept and loadable")


@pytest.mark.parametrize("flat", [True, False])  # the step-ahead loop (a device-side NaN guard) and the synchronous one
def test_nan_loss_leaves_the_adapter_of_the_last_good_step(tmp_path, monkeypatch, flat):
    """No checkpoint at the NaN step: the step-ahead loop learns of the NaN one step late, after the NaN step's update
    was skipped on the device and before the next one is applied — the adapter in memory is the one of a run that
    stopped after the last good step, and the error names the NaN step."""
    from lyco.train import from_dict
    from lyco.train.loop import Trainer, TrainingError
    from lyco.train.synthetic import make_shapes

    data = tmp_path / "data"
    make_shapes(data / "2_shape", 4, seed=3, sizes=((32, 32),))

    def cfg(out, steps):
        return from_dict({
            "model": {"path": "tiny:sd1"},
            "data": {"train_dir": str(data), "resolution": [32, 32], "bucket_reso_steps": 32, "min_bucket_reso": 32,
                     "max_bucket_reso": 64, "cache_dir": str(tmp_path / "cache")},
            "network": {"algo": "lora", "rank": 2},
            "optimizer": {"learning_rate": 1e-3, "flat": flat},
            "train": {"max_train_steps": steps, "batch_size": 2},
            "output": {"output_dir": str(out), "progress_bar": False, "log_with": "none", "save_dtype": "fp32",
                       "save_state": False},
            "eval": {"enabled": False},
        })

    ref = Trainer(cfg(tmp_path / "ref", 3))
    try:
        ref.train()
        want = {k: v.detach().clone() for k, v in ref.network.state_dict().items()}
    finally:
        ref.close()
    real = Trainer.compute_loss
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        loss = real(self, *a, **kw)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] >= 4 else loss

    monkeypatch.setattr(Trainer, "compute_loss", poisoned)
    tr = Trainer(cfg(tmp_path / "out", 6))
    try:
        with pytest.raises(TrainingError, match="NaN at step 4 "):
            tr.train()
        got = tr.network.state_dict()
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
        assert [s for s, _ in tr.losses] == [1, 2, 3]  # the NaN step is not recorded as a step
        assert tr._step_ahead() is flat
    finally:
        tr.close()
    assert not list((tmp_path / "out").glob("*.safetensors"))

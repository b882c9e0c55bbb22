"""``lyco train`` killed with SIGKILL mid-run (a subprocess on the tiny SD1 model), then resumed:
every adapter and state left on disk is complete, and ``--resume`` continues from the newest
complete state to the end."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import lyco
from lyco.formats.safetensors_io import load_tensors
from lyco.fuzz import to_toml

from _reliability_common import record


def _config(tmp_path: Path) -> Path:
    from lyco.train.synthetic import make_shapes
    data = tmp_path / "data"
    make_shapes(data / "2_shape", 4, seed=3, sizes=((32, 32),))
    out = tmp_path / "out"
    cfg = {
        "model": {"path": "tiny:sd1"},
        "data": {"train_dir": str(data), "resolution": [32, 32], "bucket_reso_steps": 32, "min_bucket_reso": 32,
                 "max_bucket_reso": 64, "cache_dir": str(out / "cache")},
        "network": {"algo": "lokr", "rank": 4, "options": {"factor": 4}},
        "optimizer": {"learning_rate": 1e-3},
        "train": {"max_train_steps": 12, "batch_size": 2},
        "output": {"output_dir": str(out), "progress_bar": False, "log_with": "none", "save_dtype": "fp32",
                   "save_every_n_steps": 2, "save_state": True, "keep_last_n_checkpoints": 3},
        "eval": {"enabled": False},
    }
    p = tmp_path / "train.toml"
    p.write_text(to_toml(cfg))
    return p


def _states(out: Path):
    return sorted(d for d in out.glob("*-state") if d.is_dir() and not d.name.startswith("."))


def test_sigkill_during_training_then_resume(tmp_path):
    cfg_path = _config(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lyco", "train", str(cfg_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rng = random.Random(0)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:  # wait for the 2nd saved state
            if len(_states(out)) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
        assert len(_states(out)) >= 2, "the run wrote no state in time"
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere in the following steps/saves
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # every visible adapter and state is complete
    adapters = sorted(p for p in out.glob("*.safetensors"))
    assert adapters
    for p in adapters:
        assert len(lyco.load(p).modules) > 0
    steps = []
    for d in _states(out):
        info = json.loads((d / "state.json").read_text())
        tensors, _ = load_tensors(d / "state.safetensors")
        assert any(k.startswith("network.") for k in tensors)
        steps.append(int(info["step"]))
    killed_at = max(steps)
    assert not (out / "last.safetensors").exists() or killed_at == 12
    # resume (in this process: the trainer is the same code the CLI runs)
    from lyco.train import load_config
    from lyco.train.loop import Trainer, find_state
    newest = find_state(str(out))
    assert json.loads(Path(newest, "state.json").read_text())["step"] == killed_at
    tr = Trainer(load_config(cfg_path), resume=str(out))
    tr.setup()
    assert tr.global_step == killed_at  # continues from the newest complete state
    res = tr.train()
    assert res.steps == 12
    a = lyco.load(res.adapter_path)
    assert all(bool(torch.isfinite(t).all()) for m in a.modules.values() for t in m.tensors.values()
               if t.is_floating_point())
    assert [s for s, _ in res.losses][-1] == 12 and [s for s, _ in res.losses][:killed_at] == list(range(1, killed_at + 1))
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    record("kills", "lyco train (subprocess, SIGKILL) then --resume",
           {"kills": 1, "killed_after_step": killed_at, "resumed_to_step": res.steps,
            "hidden_temp_leftovers": leftovers})

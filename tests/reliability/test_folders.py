"""Folders from strangers: symlink loops and odd names must not hang or crash the scanners."""

from __future__ import annotations

import os

import pytest
import torch

from lyco.errors import LycoError
from lyco.formats.safetensors_io import save_tensors
from lyco.fuzz import _Timeout, _time_limit

from _reliability_common import bad_input


def test_adapter_index_survives_symlink_loops(tmp_path):
    """``<lora:name>`` lookup walks adapter folders with followlinks=True: two links back to the
    folder itself make the walk exponential unless loops are detected."""
    from lyco.prompt import AdapterIndex
    save_tensors({"lora_unet_x.lora_down.weight": torch.ones(1, 1)}, tmp_path / "style.safetensors")
    os.symlink(".", tmp_path / "a")
    os.symlink(".", tmp_path / "b")
    try:
        with _time_limit(10.0):
            idx = AdapterIndex([tmp_path])
    except _Timeout:
        bad_input("adapter folder with symlink loops", "AdapterIndex: HANG (>10 s)")
        pytest.fail("AdapterIndex did not finish within 10 s on a folder with two self-links (os.walk "
                    "followlinks=True without loop detection)")
    except LycoError:
        return
    assert [f.path.name for f in idx.files].count("style.safetensors") == 1
    bad_input("adapter folder with symlink loops", "AdapterIndex: finished")


def test_adapter_index_survives_a_dangling_link(tmp_path):
    from lyco.prompt import AdapterIndex
    save_tensors({"lora_unet_x.lora_down.weight": torch.ones(1, 1)}, tmp_path / "style.safetensors")
    os.symlink(str(tmp_path / "missing"), tmp_path / "dangling.safetensors")
    try:
        idx = AdapterIndex([tmp_path])
    except LycoError:
        bad_input("dangling *.safetensors link in an adapter folder", "AdapterIndex: LycoError")
        return
    assert "style.safetensors" in [f.path.name for f in idx.files]
    bad_input("dangling *.safetensors link in an adapter folder", "AdapterIndex: skipped/listed, no crash")


def test_dataset_scan_survives_symlink_loops(tmp_path):
    from lyco.train.data import scan
    from lyco.train.synthetic import make_shapes
    make_shapes(tmp_path / "2_x", 1, seed=0, sizes=((16, 16),))
    os.symlink(".", tmp_path / "2_x" / "loop")
    os.symlink("..", tmp_path / "3_up")
    with _time_limit(20.0):
        subsets = scan(str(tmp_path))
    assert sum(len(s.items) for s in subsets) >= 1
    bad_input("dataset folder with symlink loops", "scan: finished")

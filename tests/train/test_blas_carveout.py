"""cuBLAS's SM count target during a capture (``lyco.train.blas_carveout``) and around the side streams' GEMMs
(``lyco.algorithms.blas_sms.side``, through ``lowrank._side_blas``): on the CPU, against a stand-in cuBLAS library and
a stand-in of torch's carveout setting — what is set, for how long, and what is put back."""

from __future__ import annotations

import warnings

import pytest
import torch

from lyco.algorithms import blas_sms as S
from lyco.algorithms import lowrank
from lyco.train import blas_carveout as M


class StandInCublas:
    """``cublasGet/SetSmCountTarget`` over a dict of handles, as ctypes would call them; ``fail`` names a call that
    returns an error status."""

    def __init__(self, targets: dict, fail: str = ""):
        self.targets, self.fail, self.calls = targets, fail, []

    def cublasGetSmCountTarget(self, handle, out):
        self.calls.append(("get", handle.value))
        if self.fail == "get":
            return 7
        out._obj.value = self.targets[handle.value]  # ctypes.byref(c_int): the int it points to
        return 0

    def cublasSetSmCountTarget(self, handle, value):
        self.calls.append(("set", handle.value, value.value))
        if self.fail == "set":
            return 7
        self.targets[handle.value] = value.value
        return 0


@pytest.fixture
def device(monkeypatch):
    """A stand-in CUDA device of 132 SMs whose thread's cuBLAS handle is 0x1234 (target 0: cuBLAS's default), and a
    stand-in of torch's carveout (None: unset)."""
    lib = StandInCublas({0x1234: 0})
    carve = {"v": None}

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    monkeypatch.setattr(torch.cuda, "current_blas_handle", lambda: 0x1234)
    monkeypatch.setattr(S, "_LIB", [lib])
    monkeypatch.setattr(S, "_WARNED", set())

    def set_c(v):
        warnings.warn("experimental", UserWarning)  # torch warns once: the block must not pass it on
        carve["v"] = v

    monkeypatch.setattr(S, "_torch_carveout", lambda: (lambda: carve["v"], set_c))
    return lib, carve


def test_the_switch(monkeypatch):
    monkeypatch.delenv("LYCO_BLAS_CARVEOUT", raising=False)
    assert M.carveout() == int(M.DEFAULT)
    monkeypatch.setenv("LYCO_BLAS_CARVEOUT", "16")
    assert M.carveout() == 16
    for bad in ("-1", "1.5", "x", ""):
        monkeypatch.setenv("LYCO_BLAS_CARVEOUT", bad)
        with pytest.raises(ValueError, match="LYCO_BLAS_CARVEOUT"):
            M.carveout()


def test_off_touches_nothing(monkeypatch, device):
    lib, carve = device
    monkeypatch.setenv("LYCO_BLAS_CARVEOUT", "0")
    with M.during_capture() as k:
        assert k == 0
    assert lib.calls == [] and carve["v"] is None


def test_set_inside_and_put_back_after(monkeypatch, device):
    lib, carve = device
    lib.targets[0x1234] = 100  # a value someone set before: it comes back, not cuBLAS's default
    carve["v"] = 4
    monkeypatch.setenv("LYCO_BLAS_CARVEOUT", "16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning reaches the caller
        with M.during_capture() as k:
            assert k == 16
            assert lib.targets[0x1234] == 132 - 16
            assert carve["v"] == 16
    assert lib.targets[0x1234] == 100 and carve["v"] == 4


def test_put_back_when_the_capture_raises(monkeypatch, device):
    lib, carve = device
    monkeypatch.setenv("LYCO_BLAS_CARVEOUT", "8")
    with pytest.raises(RuntimeError, match="capture failed"):
        with M.during_capture():
            assert lib.targets[0x1234] == 124 and carve["v"] == 8
            raise RuntimeError("capture failed")
    assert lib.targets[0x1234] == 0 and carve["v"] is None


def test_no_more_than_the_device_has(monkeypatch, device):
    lib, _ = device
    monkeypatch.setenv("LYCO_BLAS_CARVEOUT", "132")
    with pytest.raises(ValueError, match="fewer SMs than the device's 132"):
        with M.during_capture():
            pass
    assert lib.calls == []


@pytest.mark.parametrize("fail", ["get", "set"])
def test_a_failing_call_leaves_the_defaults_with_one_warning(monkeypatch, device, fail):
    lib, carve = device
    lib.fail = fail
    monkeypatch.setenv("LYCO_BLAS_CARVEOUT", "16")
    for _ in range(2):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with M.during_capture() as k:
                assert k == 0
        assert lib.targets[0x1234] == 0 and carve["v"] is None
    assert len(S._WARNED) == 1 and f"cublas{fail.capitalize()}SmCountTarget failed" in next(iter(S._WARNED))


def test_without_the_library(monkeypatch, device):
    _, carve = device
    monkeypatch.setattr(S, "_LIB", [None])
    monkeypatch.setenv("LYCO_BLAS_CARVEOUT", "16")
    with pytest.warns(RuntimeWarning, match="could not be loaded"):
        with M.during_capture() as k:
            assert k == 0
    assert carve["v"] is None


def test_without_cuda_nothing_happens(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(S, "_LIB", [])  # would be loaded on first use: not here
    monkeypatch.setenv("LYCO_BLAS_CARVEOUT", "16")
    with M.during_capture() as k:
        assert k == 0
    assert S._LIB == []


def test_this_torch_has_the_carveout_setting():
    """The stand-in replaces torch's pair; the module reads the real names, which torch 2.13 (and 2.11 on the GPU
    machine, run 301) has."""
    get_c, set_c = S._torch_carveout()
    assert callable(get_c) and callable(set_c)


class SideStream:
    """What ``_side_blas`` reads of a stream: its device."""

    def __init__(self, kind: str = "cuda"):
        self.device = torch.device(kind)


@pytest.fixture
def capturing(monkeypatch):
    state = {"on": True}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["on"])
    monkeypatch.setattr(lowrank, "_side_workspace", lambda: None)  # the workspace sizes: not what is tested here
    return state


def test_side_switch(monkeypatch):
    monkeypatch.delenv("LYCO_SIDE_SMS", raising=False)
    assert S.side_sms() == int(S.DEFAULT_SIDE) > 0
    monkeypatch.setenv("LYCO_SIDE_SMS", "48")
    assert S.side_sms() == 48
    for bad in ("-2", "3.0", "many"):
        monkeypatch.setenv("LYCO_SIDE_SMS", bad)
        with pytest.raises(ValueError, match="LYCO_SIDE_SMS"):
            S.side_sms()


def test_side_region_in_a_capture_is_set_and_put_back(monkeypatch, device, capturing):
    lib, carve = device
    lib.targets[0x1234] = 116  # the capture-wide target of LYCO_BLAS_CARVEOUT=16: back after the side region
    carve["v"] = 16
    monkeypatch.setenv("LYCO_SIDE_SMS", "32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with lowrank._side_blas(SideStream()):
            assert lib.targets[0x1234] == 32 and carve["v"] == 132 - 32
    assert lib.targets[0x1234] == 116 and carve["v"] == 16
    with pytest.raises(RuntimeError, match="in the region"):
        with lowrank._side_blas(SideStream()):
            raise RuntimeError("in the region")
    assert lib.targets[0x1234] == 116 and carve["v"] == 16


@pytest.mark.parametrize("case", ["not capturing", "off", "as many as the device", "no side stream", "cpu stream",
                                  "not asked"])
def test_side_region_left_alone(monkeypatch, device, capturing, case):
    lib, carve = device
    monkeypatch.setenv("LYCO_SIDE_SMS", {"off": "0", "as many as the device": "132"}.get(case, "32"))
    capturing["on"] = case != "not capturing"
    stream = {"no side stream": None, "cpu stream": SideStream("cpu")}.get(case, SideStream())
    with lowrank._side_blas(stream, case != "not asked"):  # not asked: a region of weight-sized GEMMs (rebuild)
        pass
    assert lib.calls == [] and carve["v"] is None

"""cuBLAS's SM count target, scoped to a block: the GEMMs the block issues chosen for fewer SMs than the card has
(issue 7, sessions 42–43). ``cublasSetSmCountTarget`` on the calling thread's cuBLAS handle and torch's cuBLASLt
carveout (``_set_sm_carveout_experimental``: the cuBLASLt descriptor's ``SM_COUNT_TARGET`` on torch's cuBLASLt paths)
tell cuBLAS's heuristics how many SMs to plan a GEMM for: its tile, its split-K, so its number of CTAs.

Two users, both in captured steps only (the kernels chosen are baked into the graph; eager GEMMs and the user's own
never see the setting):

* :func:`side` — the side streams' own products (``lyco.algorithms.lowrank._side_blas``: ∂U, ∂h, ∂D, the forward's
  down, the merges built ahead) chosen for ``LYCO_SIDE_SMS`` SMs, **32 by default**, so that these thin products take
  fewer SMs from the frozen layers' GEMMs running beside them. Why: at SDXL b1 (H200, 132 SMs) the frozen 1280² GEMMs
  at 1024 rows ran 8.1 µs (median) in the floor's step and 12.0 in LoRA's (run 300's traces, 306 of them). Measured
  (H200, captured bf16 steps, 0 = cuBLAS's own choice; runs 305–306): SDXL b1 LoRA **67.95 / 67.17 / 67.96 / 67.24 ms**
  at 0 / 32 / 0 / 32 (16: 68.01, 48: 67.65, 64: 67.86; floor 58.38 and 57.93); SD1.5 b1 LoRA 21.52 / 21.61 / 21.47 at
  32 / 0 / 32, LoCon 23.11 / 23.27 / 23.11; SD1.5 b8 LoRA 64.27 / 64.86 / 64.26, LoCon 63.87 / 64.35 / 64.07; SDXL b4
  LoRA 171.51 / 171.42 / 171.91 (the one size without a gain: +0.1 to +0.5 ms, within its run-to-run spread). With
  32 as the default (runs 307–308): SD1.5 b1 LoKr 25.49 / 25.61 / 25.44 at 32 / 0 / 32, LoHa 24.86 / 25.08 / 24.82
  (floor 19.80); SDXL b1 LoCon 67.17 / 68.00 at 32 / 0 (floor 58.15); the trainer's graphs equal to eager (lora,
  locon, lokr, loha). The graphs' peaks equal at every size. A card with no more SMs than the value: no effect.
  LoKr's batched factor products' tail stream (``factor_batch``) does not go through ``_side_blas``: in captured steps
  its backward is a Triton kernel, not cuBLAS.
* ``lyco.train.blas_carveout`` — the whole capture's GEMMs (the frozen ones) chosen for ``SMs − LYCO_BLAS_CARVEOUT``,
  opt-in (its doc has the numbers: a loss at batch 4 and 8).

Where the cuBLAS library or torch's handle cannot be reached, or a call fails, the block runs with cuBLAS's own
choice and one warning per cause.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import warnings

import torch

from . import graph_policy

#: ``LYCO_SIDE_SMS`` when unset (module doc: runs 305–306)
DEFAULT_SIDE = "32"

_LIB: list = []  # [the cuBLAS library, or None where it cannot be loaded], once per process
_WARNED: set = set()


def sms_setting(name: str, default: str) -> int:
    """The whole number of SMs >= 0 in the environment variable ``name`` (``default`` when unset): read by
    :func:`.graph_policy.env_int`, an error naming the variable where it is not a whole number or is negative."""
    k = graph_policy.env_int(name, int(default), "a number of SMs, 0 = off")
    if k < 0:
        raise ValueError(f"{name}={os.environ.get(name)!r}: expected a whole number of SMs >= 0 (0 = off)")
    return k


def side_sms() -> int:
    """``LYCO_SIDE_SMS``: the SMs the side streams' GEMMs of a capture are chosen for (0: cuBLAS's own choice)."""
    return sms_setting("LYCO_SIDE_SMS", DEFAULT_SIDE)


def device_sms() -> int:
    """The current CUDA device's SM count."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _cublas():
    """The cuBLAS library torch loaded (found in the process's mappings), else ``libcublas.so.12``; None where
    neither loads."""
    if not _LIB:
        lib = None
        try:
            with open("/proc/self/maps") as f:
                paths = [ln.split()[-1] for ln in f if "libcublas.so" in ln and "libcublasLt" not in ln]
        except OSError:
            paths = []
        for name in paths[:1] + ["libcublas.so.12"]:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        _LIB.append(lib)
    return _LIB[0]


def _warn(why: str, setting: str) -> None:
    if (why, setting) not in _WARNED:
        _WARNED.add((why, setting))
        warnings.warn(f"lyco: {setting} has no effect ({why}); the capture runs with cuBLAS's own kernel choice",
                      RuntimeWarning, stacklevel=4)


def _torch_carveout():
    """torch's getter and setter of the cuBLASLt SM carveout, or (None, None) where this torch has none."""
    return (getattr(torch._C, "_get_sm_carveout_experimental", None),
            getattr(torch._C, "_set_sm_carveout_experimental", None))


@contextlib.contextmanager
def sm_target(n: int, setting: str):
    """The block's cuBLAS GEMMs chosen for ``n`` SMs (0 < n < the device's SMs): the calling thread's handle and
    torch's cuBLASLt carveout, the previous values back after the block — also when it raises. Yields whether the
    setting took (``setting``: the variable named in the one warning where it cannot)."""
    sms = device_sms()
    lib = _cublas()
    if lib is None:
        _warn("the cuBLAS library could not be loaded", setting)
        yield False
        return
    handle = ctypes.c_void_p(torch.cuda.current_blas_handle())
    prev = ctypes.c_int(0)
    if lib.cublasGetSmCountTarget(handle, ctypes.byref(prev)) != 0:
        _warn("cublasGetSmCountTarget failed", setting)
        yield False
        return
    get_c, set_c = _torch_carveout()
    prev_c = get_c() if get_c is not None else None
    if lib.cublasSetSmCountTarget(handle, ctypes.c_int(n)) != 0:
        _warn("cublasSetSmCountTarget failed", setting)
        yield False
        return
    try:
        if set_c is not None:
            with warnings.catch_warnings():  # torch warns once that its setting is experimental: ours is scoped
                warnings.simplefilter("ignore")
                set_c(sms - n)
        yield True
    finally:
        lib.cublasSetSmCountTarget(handle, prev)
        if set_c is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                set_c(prev_c)


def side(cuda: bool):
    """Around a side region's GEMMs (``lowrank._side_blas``; ``cuda``: the side stream is a CUDA one): cuBLAS's
    kernels for :func:`side_sms` SMs while a capture is under way — a no-op outside captures, with the setting 0, or
    where the device has no more SMs than it."""
    if not cuda:
        return contextlib.nullcontext(False)
    n = side_sms()
    # is_available first: a CPU build's is_current_stream_capturing raises (the tests' stand-in CUDA streams)
    if n == 0 or not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing() or n >= device_sms():
        return contextlib.nullcontext(False)
    return sm_target(n, "LYCO_SIDE_SMS")

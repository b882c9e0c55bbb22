"""cuBLAS told, while a training step is captured, to pick its GEMM kernels for fewer SMs than the card has, leaving
some to lyco's side streams (issue 7, session 42).

What it is for: in a captured step the adapters' own products (∂h, ∂D, ∂U, the forward's down, the merges built ahead)
run on side streams beside the frozen layers' GEMMs (:func:`lyco.algorithms.lowrank.side_stream`). At SDXL b1 on an H200
(132 SMs) the frozen 1280² GEMMs at 1024 rows are one wave of 128 CTAs (cuBLAS's ``128x80`` tile: 8 × 16 tiles, by
inference from the kernel's name — the trace records no shapes); with a side kernel holding a few SMs some of those CTAs
wait for a second wave (also an inference: what the times below fit). Run 300's traces: their median 8.1 µs in the
floor's step, 12.0 in LoRA's (306 of them; the forward's ``80x128 bias`` GEMMs 8.5 → 12.0, 186), 14.8 in LoKr's.
``cublasSetSmCountTarget`` (per cuBLAS handle) and torch's ``_set_sm_carveout_experimental`` (the cuBLASLt descriptor's
``SM_COUNT_TARGET`` on torch's cuBLASLt paths) make cuBLAS choose for ``SMs − k``.

Measured with both set process-wide (``benchmarks/experiments/sm_carveout.py``, H200): SDXL b1 LoRA 68.25 / 67.82 /
68.27 / 67.81 ms at k = 0 / 16 / 0 / 16 (run 302), LoKr 78.53 / 78.42 / 78.55 / 78.42; run 301: LoRA 68.38 at 0, 68.53
at 8, 67.88 at 16, 70.86 at 32; SD1.5 b1 LoRA 21.81 → 21.73, LoCon 23.41 → 23.35 at 16; the floor (no side streams)
58.39 → 58.98 and 19.82 → 19.88 — which is why this applies to lyco's captures only. This module (set during the capture
only, run 303): SDXL b1 LoRA **67.42 / 67.88 / 67.60 ms** at 16 / 0 / 16 (floor 58.17: 1.159–1.162× against 1.167×), the
graph's peak 9.853 → 9.884 GiB (the floor's 9.911). Batch 8 and SDXL b4 (many-wave GEMMs, where fewer SMs may cost more
than the wave saves) are not measured: **off by default** (``LYCO_BLAS_CARVEOUT`` = the SMs to leave out, 0 = off; 16 is
what was measured).

:func:`during_capture` sets both around a capture and puts the previous values back after it: the kernels chosen are
baked into the graph, and nothing outside the capture (the user's own GEMMs, eager steps) sees the setting. Captured
steps run their backward on the calling thread (:func:`lyco.algorithms.graph_policy.graph_step`), so the calling
thread's cuBLAS handle is the one every GEMM of the capture uses (with ``LYCO_CALLER_BACKWARD=0`` the backward's GEMMs
run on autograd's thread and its handle, and take only torch's cuBLASLt setting). Where the cuBLAS library or torch's
handle cannot be reached the capture runs as it would without, with one warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import warnings

import torch

#: ``LYCO_BLAS_CARVEOUT`` when unset: off until measured at batch 8 and SDXL b4 (module doc)
DEFAULT = "0"

_LIB: list = []  # [the cuBLAS library, or None where it cannot be loaded], once per process
_WARNED: set = set()


def carveout() -> int:
    """``LYCO_BLAS_CARVEOUT``: the SMs a captured step's GEMMs leave to lyco's side streams (0: none, cuBLAS's own
    choice)."""
    v = os.environ.get("LYCO_BLAS_CARVEOUT", DEFAULT)
    try:
        k = int(v)
    except ValueError:
        k = -1
    if k < 0:
        raise ValueError(f"LYCO_BLAS_CARVEOUT={v!r}: expected a whole number of SMs >= 0 (0 = off)")
    return k


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


def _warn(why: str) -> None:
    if why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(f"lyco: LYCO_BLAS_CARVEOUT has no effect ({why}); the capture runs with cuBLAS's own kernel "
                      "choice", RuntimeWarning, stacklevel=3)


def _torch_carveout():
    """torch's getter and setter of the cuBLASLt SM carveout, or (None, None) where this torch has none."""
    return (getattr(torch._C, "_get_sm_carveout_experimental", None),
            getattr(torch._C, "_set_sm_carveout_experimental", None))


@contextlib.contextmanager
def during_capture():
    """Around a capture: cuBLAS's GEMMs chosen for the card's SMs less :func:`carveout` (the calling thread's handle
    and torch's cuBLASLt setting), the previous values back after the block — also when it raises. Yields the SMs
    left out (0 where off or unavailable)."""
    k = carveout()
    if k == 0:
        yield 0
        return
    if not torch.cuda.is_available():
        yield 0
        return
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    if k >= sms:
        raise ValueError(f"LYCO_BLAS_CARVEOUT={k}: expected fewer SMs than the device's {sms}")
    lib = _cublas()
    if lib is None:
        _warn("the cuBLAS library could not be loaded")
        yield 0
        return
    handle = ctypes.c_void_p(torch.cuda.current_blas_handle())
    prev = ctypes.c_int(0)
    if lib.cublasGetSmCountTarget(handle, ctypes.byref(prev)) != 0:
        _warn("cublasGetSmCountTarget failed")
        yield 0
        return
    get_c, set_c = _torch_carveout()
    prev_c = get_c() if get_c is not None else None
    if lib.cublasSetSmCountTarget(handle, ctypes.c_int(sms - k)) != 0:
        _warn("cublasSetSmCountTarget failed")
        yield 0
        return
    try:
        if set_c is not None:
            with warnings.catch_warnings():  # torch warns once that its setting is experimental: ours is scoped
                warnings.simplefilter("ignore")
                set_c(k)
        yield k
    finally:
        lib.cublasSetSmCountTarget(handle, prev)
        if set_c is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                set_c(prev_c)

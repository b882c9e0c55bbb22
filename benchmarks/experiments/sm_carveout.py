#!/usr/bin/env python3
"""Probe (issue 7, session 42): the frozen GEMMs of an adapted step told to leave SMs to the adapter's side streams.

Run 300's SDXL b1 traces (H200, 132 SMs): the frozen 1280² GEMMs at 1024 rows — cuBLAS's ``128x80`` tile, by inference
from its name 8 × 16 = 128 CTAs, one wave (the trace has no shapes) — take 8.1 µs (median) in the floor's step and 12.0
in LoRA's (306 of them; the forward's ``80x128 bias`` 8.5 → 12.0, 186), LoKr's 14.8: in LoRA's step the adapter's thin
products run beside them on the side streams, holding some SMs, so a few of the GEMM's CTAs wait for a second wave.
cuBLAS can be told to pick its kernel for fewer SMs (``cublasSetSmCountTarget`` on a handle; torch's
``_set_sm_carveout_experimental`` sets the cuBLASLt descriptor's ``SM_COUNT_TARGET`` on the paths that use cuBLASLt).

``apply(k)`` sets both for the process (k SMs left out; 0 undoes); ``python sm_carveout.py`` times a 1024 × 1280 ×
1280 GEMM chain alone and beside a side stream of thin products, for several k (one graph each). The library's form,
set during lyco's captures only, is ``lyco.train.blas_carveout`` (its cuBLAS library, ``lyco.algorithms.blas_sms``,
is the one loaded here).
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from _common import capture_graph, replay_us  # noqa: E402

from lyco.algorithms.blas_sms import _cublas  # noqa: E402


def apply(carveout: int) -> str:
    """Leave ``carveout`` SMs out of every cuBLAS GEMM's kernel choice from now on (the current thread's handle
    and torch's cuBLASLt paths); 0 restores the defaults. Returns what was set."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    out = []
    if hasattr(torch._C, "_set_sm_carveout_experimental"):
        torch._C._set_sm_carveout_experimental(carveout if carveout else None)
        out.append(f"torch carveout {torch._C._get_sm_carveout_experimental()}")
    target = sms - carveout if carveout else 0
    out.append(_set_handle(target) + f" of {sms}")

    class _OnBackwardThread(torch.autograd.Function):  # autograd runs CUDA backwards on its own thread: its handle
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            out.append("backward thread: " + _set_handle(target))
            return g

    x = torch.zeros(1, device="cuda", requires_grad=True)
    _OnBackwardThread.apply(x).sum().backward()
    return "; ".join(out)


def _set_handle(target: int) -> str:
    lib = _cublas()
    h = ctypes.c_void_p(torch.cuda.current_blas_handle())
    rc = lib.cublasSetSmCountTarget(h, ctypes.c_int(target))
    got = ctypes.c_int(-1)
    lib.cublasGetSmCountTarget(h, ctypes.byref(got))
    return f"cublasSetSmCountTarget rc {rc} -> {got.value}"


def _bench(carveout: int, side: bool, reps: int = 20) -> float:
    apply(carveout)
    g0 = torch.Generator(device="cuda").manual_seed(0)
    dy = torch.randn(1024, 1280, device="cuda", dtype=torch.bfloat16, generator=g0)
    w = torch.randn(1280, 1280, device="cuda", dtype=torch.bfloat16, generator=g0)
    x = torch.randn(1024, 1280, device="cuda", dtype=torch.bfloat16, generator=g0)
    u = torch.randn(1280, 16, device="cuda", dtype=torch.bfloat16, generator=g0)
    s2 = torch.cuda.Stream()

    def body():
        outs = []
        for _ in range(reps):
            if side:
                s2.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s2):
                    h = dy @ u            # ∂h
                    outs.append(h.t() @ x)  # ∂D
                    outs.append(dy.t() @ h)  # ∂U
            outs.append(dy @ w)          # ∂x
            if side:
                torch.cuda.current_stream().wait_stream(s2)
        return outs

    us = replay_us(capture_graph(body), reps, replays=15, warmup=3)
    apply(0)
    return us


def main() -> None:
    print(apply(8))
    apply(0)
    ks = [int(v) for v in sys.argv[1:]] or [0, 4, 8, 16, 24, 32]
    for k in ks:
        print(f"carveout {k:3d}: chain alone {_bench(k, False):6.2f} µs/GEMM, beside the thin products "
              f"{_bench(k, True):6.2f} µs/group")


if __name__ == "__main__":
    main()

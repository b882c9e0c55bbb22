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
graph's peak 9.853 → 9.884 GiB (the floor's 9.911). Where the GEMMs are many waves it costs (run 304, 16 / 0 / 16):
SD1.5 b8 LoRA 65.03 / 64.90 / 65.05 ms, LoKr — / 72.73 / 72.66; SDXL b4 LoRA **175.89 / 170.77 / 175.42**, LoKr 196.17 /
193.07 / 196.21 — so it is **off by default** (``LYCO_BLAS_CARVEOUT`` = the SMs to leave out, 0 = off). Its other
form, the side streams' own GEMMs chosen for few SMs (:func:`lyco.algorithms.blas_sms.side`, ``LYCO_SIDE_SMS``), is on
by default: inside a side region that target replaces this one and this one comes back after it. Both at SDXL b1
(run 306, one leg): LoRA 66.75 ms against 67.18 with the side's alone.

:func:`during_capture` sets both around a capture and puts the previous values back after it: the kernels chosen are
baked into the graph, and nothing outside the capture (the user's own GEMMs, eager steps) sees the setting. Captured
steps run their backward on the calling thread (:func:`lyco.algorithms.graph_policy.graph_step`), so the calling
thread's cuBLAS handle is the one every GEMM of the capture uses (with ``LYCO_CALLER_BACKWARD=0`` the backward's GEMMs
run on autograd's thread and its handle, and take only torch's cuBLASLt setting). Where the cuBLAS library or torch's
handle cannot be reached the capture runs as it would without, with one warning (:mod:`lyco.algorithms.blas_sms`
holds the cuBLAS calls).
"""

from __future__ import annotations

import contextlib

import torch

from ..algorithms import blas_sms

#: ``LYCO_BLAS_CARVEOUT`` when unset: off — a loss at batch 8 and at SDXL b4 (module doc, run 304)
DEFAULT = "0"


def carveout() -> int:
    """``LYCO_BLAS_CARVEOUT``: the SMs a captured step's GEMMs leave to lyco's side streams (0: none, cuBLAS's own
    choice)."""
    return blas_sms.sms_setting("LYCO_BLAS_CARVEOUT", DEFAULT)


@contextlib.contextmanager
def during_capture():
    """Around a capture: cuBLAS's GEMMs chosen for the card's SMs less :func:`carveout` (the calling thread's handle
    and torch's cuBLASLt setting, :func:`.blas_sms.sm_target`), the previous values back after the block — also when
    it raises. Yields the SMs left out (0 where off or unavailable)."""
    k = carveout()
    if k == 0 or not torch.cuda.is_available():
        yield 0
        return
    sms = blas_sms.device_sms()
    if k >= sms:
        raise ValueError(f"LYCO_BLAS_CARVEOUT={k}: expected fewer SMs than the device's {sms}")
    with blas_sms.sm_target(sms - k, "LYCO_BLAS_CARVEOUT") as ok:
        yield k if ok else 0

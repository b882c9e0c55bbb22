#!/usr/bin/env python3
"""LoKr's ∂U on its LoRA form at SDXL b1: which GEMM forms take cuBLAS's split-K second launch (issue 7, prepared in
session 44 for the next; not yet run).

Run 300's SDXL b1 timelines have LoKr's step with +944 ``splitKreduce_kernel`` launches over LoRA's (3.59 ms exposed)
and +466 ``nvjet…32x64…splitK…NTN`` GEMMs — by inference ``∂U = s·∂yᵀh`` of the LoRA form ``U = kron(W1, A)``: out ×
128 (in_m·r = 8·16), K = the rows (4096 at the 640-channel level, 1024 at the 1280-channel one). LoRA's rank-16 ∂U
takes a kernel without split-K. The op writes ∂U in U's dtype (``lowrank._meta``'s ``up.dtype``: bf16 here, and the
trace's reduce kernels write bf16); the factor batch's backward reduces it to ∂W1, ∂A. Forms, each as it would run on
the side stream of a capture (``blas_sms.side``):

* ``mm``: ``torch.mm(∂yᵀ, h)`` in bf16 — the op's form with s = 1 (``lowrank._mm``);
* ``mm_f32``: the same with ``out_dtype=float32``;
* ``addmm_f32``: ``addmm(·, ∂yᵀ, h, beta=0, alpha=s, out_dtype=float32)`` — with the scale in the GEMM;
* ``chunks{c}``: K split by hand into c chunks as a batched GEMM (c, out, 128) in fp32 and summed — the split-K's
  partials made visible, to see whether a reduction fused into the factor batch's backward could take their sum.

Per shape and form: µs per call (20 calls in one graph, median of 7 replays) and the kernels one call launches
(names from the profiler: does it hold a ``splitKreduce``?).

    PYTHONPATH=src python benchmarks/experiments/lokr_du_forms.py [--out FILE]
"""

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _common import capture_graph, replay_us  # noqa: E402

from lyco.algorithms import blas_sms  # noqa: E402

#: (rows, out): SDXL b1 at 1024 px — the 640-channel level's attention / proj (640), GEGLU projection (5120), the
#: 1280-channel level's (1280, 10240); ff.net.2's out is the channels
SHAPES = [(4096, 640), (4096, 5120), (1024, 1280), (1024, 10240)]
RANK = 128
S = 1.0


def _forms(gy, h):
    out, r = gy.shape[1], h.shape[1]
    forms = {
        "mm": lambda: torch.mm(gy.t(), h),
        "mm_f32": lambda: torch.mm(gy.t(), h, out_dtype=torch.float32),
        "addmm_f32": lambda: torch.addmm(gy.new_empty((), dtype=torch.float32), gy.t(), h, beta=0, alpha=S,
                                         out_dtype=torch.float32),
    }
    for c in (4, 8):
        if gy.shape[0] % c == 0:
            k = gy.shape[0] // c
            forms[f"chunks{c}"] = (lambda c=c, k=k: torch.bmm(gy.view(c, k, out).transpose(1, 2), h.view(c, k, r),
                                                              out_dtype=torch.float32).sum(0))
    return forms


def _kernels(fn):
    """The kernel names one call of ``fn`` launches (eagerly, under the profiler, cuBLAS told the side regions' SMs
    as in a capture: ``blas_sms.side`` acts only in captures)."""
    from torch.profiler import ProfilerActivity, profile
    n = blas_sms.side_sms()
    ctx = blas_sms.sm_target(n, "LYCO_SIDE_SMS") if 0 < n < blas_sms.device_sms() else contextlib.nullcontext()
    with ctx:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    return [e.name[:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev), "side SMs", blas_sms.side_sms(), flush=True)
    recs = []
    for rows, out in SHAPES:
        g = torch.Generator(device=dev).manual_seed(rows + out)
        gy = torch.randn(rows, out, device=dev, dtype=torch.bfloat16, generator=g)
        h = torch.randn(rows, RANK, device=dev, dtype=torch.bfloat16, generator=g)
        ref = gy.double().t() @ h.double()
        for name, fn in _forms(gy, h).items():
            try:
                got = fn()
            except (RuntimeError, TypeError) as e:  # a torch without out_dtype for this op
                recs.append({"rows": rows, "out": out, "form": name, "error": str(e)[:120]})
                print(json.dumps(recs[-1]), flush=True)
                continue
            err = ((got.double() - ref).norm() / ref.norm()).item()

            def body(fn=fn):
                for _ in range(20):
                    with blas_sms.side(True):
                        fn()
            us = replay_us(capture_graph(body), 20, 7)
            rec = {"rows": rows, "out": out, "form": name, "us": round(us, 2), "rel_err": float(f"{err:.2e}"),
                   "kernels": _kernels(fn)}
            recs.append(rec)
            print(json.dumps(rec), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "rank": RANK, "records": recs}, f, indent=1)


if __name__ == "__main__":
    main()

"""benchmarks/_common.py ``kernel_makers`` (``train_step.py --graph-makers`` / ``--profile-makers``): each launch charged
to the op that made it, grouped by the op's shapes, its enclosing ops and lyco's innermost frame — on the CPU, where
the aten ops themselves stand for kernels."""

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from _common import kernel_makers  # noqa: E402

from lyco.algorithms.base import accumulate_conv1x1  # noqa: E402


def test_makers_name_op_shapes_parent_and_lyco_frame():
    # no record_function range here: with one inside a profile that records stacks, torch 2.13 sometimes fails to
    # decode an event's name (UnicodeDecodeError while parsing, ≈ 4 in 10 runs under pytest)
    acc, h, w = torch.randn(2, 6, 4, 5), torch.randn(2, 3, 4, 5), torch.randn(6, 3, 1, 1, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=True) as prof:
        for _ in range(3):
            accumulate_conv1x1(acc, h, w, alpha=0.5).sum().backward()
    rows = kernel_makers(prof, 3, ["aten::baddbmm", "aten::no_such_op"])
    assert [r["pattern"] for r in rows] == ["aten::baddbmm"]  # one group: three calls of one op, one shape
    (r,) = rows
    assert r["op"] == "aten::baddbmm" and r["calls_per_step"] == 1.0 and r["ms_per_step"] > 0
    assert r["shapes"] == str([[2, 6, 20], [2, 6, 3], [2, 3, 20], [], []])
    assert r["lyco_frame"].startswith("algorithms/base.py(") and "accumulate_conv1x1" in r["lyco_frame"]
    # the backward's GEMM for w's gradient, charged to its autograd node (no lyco frame: autograd's C++ runs it)
    rows = [r for r in kernel_makers(prof, 3, ["aten::bmm"]) if "BaddbmmBackward0" in r["parents"]]
    assert rows and all(r["lyco_frame"] == "" for r in rows)

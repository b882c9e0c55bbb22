#!/usr/bin/env python3
"""The thin conv (``lyco/algorithms/lowrank_triton.py``: ``thin_conv``, a conv adapter's down ``h = conv(x, D)`` with
r outputs as one Triton implicit GEMM whose N is the rank) on the GPU — issue 7, NOTES change 98: per SD1.5 b8 3×3
stride-1 conv shape (channels-last input, rank 8), its relative error against float64, then device time per call as
CUDA-graph replays over four input sets in turn: the kernel at each position tile, and cuDNN's conv on the same
channels-last input and weight (what the op ran before). Shapes the op's rule leaves to cuDNN (16×16, 8×8) are
timed too.

    python benchmarks/experiments/thin_conv_check.py     # exit 1 if a relative error exceeds --tol

Taken out after run 142 (slower than cuDNN at every shape: 45 against 32 µs at 8 × 320 × 64², 2–7× at 16×16 and
below); the kernel lives on only in ``benchmarks/experiments/thin_conv.patch`` — apply it (``git apply``) to run this.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lyco.algorithms import lowrank, lowrank_triton  # noqa: E402
from fused_gemm_check import timed  # noqa: E402
from taps_down_check import SHAPES  # noqa: E402  (SD1.5 b8's 3×3 stride-1 conv inputs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tol", type=float, default=1e-2)
    ap.add_argument("--rank", type=int, default=8)
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    g = torch.Generator().manual_seed(0)
    worst, total = 0.0, {}
    for n, c, s in SHAPES:
        xs = [torch.randn(n, c, s, s, generator=g).to(dev, dt).contiguous(memory_format=torch.channels_last)
              for _ in range(4)]
        d = (torch.randn(a.rank, c, 3, 3, generator=g) / (9 * c) ** 0.5).to(dev, dt)
        dcl = d.contiguous(memory_format=torch.channels_last)
        h = lowrank_triton.thin_conv(xs[0], d, (1, 1))
        ref = F.conv2d(xs[0].double(), d.double(), padding=1)
        err = ((h.double() - ref).norm() / ref.norm()).item()
        cud = F.conv2d(xs[0], dcl, padding=1)
        err_cudnn = ((cud.double() - ref).norm() / ref.norm()).item()
        worst = max(worst, err)
        rule = lowrank._THIN_MIN_BLOCKS <= n * (s * s // 64)
        t_cudnn = timed(lambda i: F.conv2d(xs[i], dcl, padding=1))
        row = f"{n}x{c}x{s}x{s} r{a.rank}  err {err:.1e} (cuDNN {err_cudnn:.1e})  cuDNN {t_cudnn:7.1f} us"
        for bm in (64, 128):
            lowrank_triton._THIN_CFG.update(BM=bm, BM_SMALL=bm)
            t = timed(lambda i: lowrank_triton.thin_conv(xs[i], d, (1, 1)))
            row += f"  BM{bm} {t:7.1f} us"
            total.setdefault(bm, [0.0, 0.0])
            total[bm][0] += t
        lowrank_triton._THIN_CFG.update(BM=128, BM_SMALL=64)
        t = timed(lambda i: lowrank_triton.thin_conv(xs[i], d, (1, 1)))
        total.setdefault("cfg", [0.0, 0.0])
        total["cfg"][0] += t
        row += f"  default {t:7.1f} us  {'rule takes it' if rule else 'rule: cuDNN'}"
        print(row, flush=True)
    print(f"worst relative error {worst:.2e} (tolerance {a.tol})")
    return 0 if worst <= a.tol else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A conv adapter's down as one GEMM and a tap sum (``lyco/algorithms/lowrank.py``: ``_taps_down``; ``z = x·[D_t]ᵀ``
in fp32, then ``lowrank_triton.tap_sum``) on the GPU — issue 7, NOTES change 99: per SD1.5 b8 3×3 stride-1 conv
shape (channels-last input, rank 8 as LoCon's and 16 as LoHa's Khatri–Rao form), the relative error of h against
float64 (cuDNN's alongside), then device time per call as CUDA-graph replays over four input sets in turn: the GEMM
and the sum, and cuDNN's conv on the same channels-last input and weight (what the op runs without it); then LoKr's
grouped down (change 100: 8 channel groups, rank 16) against the op's cuDNN form over the NCHW x folded into the batch.

    python benchmarks/experiments/taps_down_check.py     # exit 1 if a relative error exceeds --tol
"""

import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lyco.algorithms import lowrank  # noqa: E402
from lyco.algorithms.base import LayerSpec  # noqa: E402
from fused_gemm_check import timed  # noqa: E402

# (batch, in channels, side): SD1.5 b8's 3×3 stride-1 conv inputs (the up blocks' conv1 reads the concatenated skip)
SHAPES = [(8, 320, 64), (8, 640, 64), (8, 960, 64), (8, 320, 32), (8, 640, 32), (8, 960, 32), (8, 1280, 32),
          (8, 640, 16), (8, 1280, 16), (8, 2560, 16), (8, 1280, 8), (8, 2560, 8)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tol", type=float, default=1e-2)
    a = ap.parse_args()
    os.environ["LYCO_TAPS_DOWN"] = "1"
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    g = torch.Generator().manual_seed(0)
    worst, tot = 0.0, {}
    for rank in (8, 16):
        for n, c, s in SHAPES:
            spec = LayerSpec.from_module(nn.Conv2d(c, 320, 3, padding=1))
            xs = [torch.randn(n, c, s, s, generator=g).to(dev, dt).contiguous(memory_format=torch.channels_last)
                  for _ in range(4)]
            d = (torch.randn(rank, c, 3, 3, generator=g) / (9 * c) ** 0.5).to(dev, dt)
            dcl = d.contiguous(memory_format=torch.channels_last)
            h = lowrank._taps_down(spec, xs[0], d)
            if h is None:
                print("the taps path refused the shape", n, c, s)
                return 1
            ref = F.conv2d(xs[0].double(), d.double(), padding=1)
            err = ((h.double() - ref).norm() / ref.norm()).item()
            err_c = ((F.conv2d(xs[0], dcl, padding=1).double() - ref).norm() / ref.norm()).item()
            worst = max(worst, err)
            t_c = timed(lambda i: F.conv2d(xs[i], dcl, padding=1))
            t_t = timed(lambda i: lowrank._taps_down(spec, xs[i], d))
            tot.setdefault(rank, [0.0, 0.0])
            tot[rank][0] += t_c
            tot[rank][1] += t_t
            print(f"r{rank:<3d}{n}x{c}x{s}x{s}  err {err:.1e} (cuDNN {err_c:.1e})  cuDNN {t_c:7.1f} us  "
                  f"GEMM+tap sum {t_t:7.1f} us", flush=True)
    # LoKr's grouped down (factor 8: d on each of 8 channel groups, rank 16), against the op's cuDNN form without
    # it (the NCHW x folded into the batch, a conv of C/8 channels)
    for n, c, s in SHAPES:
        grp, rank = 8, 16
        spec = LayerSpec.from_module(nn.Conv2d(c, 320, 3, padding=1))
        xs = [torch.randn(n, c, s, s, generator=g).to(dev, dt) for _ in range(4)]
        xcl = [t.contiguous(memory_format=torch.channels_last) for t in xs]
        d = (torch.randn(rank, c // grp, 3, 3, generator=g) / (9 * c / grp) ** 0.5).to(dev, dt)
        h = lowrank._taps_down(spec, xcl[0], d, grp)
        ref = F.conv2d(xs[0].double(), d.double().repeat(grp, 1, 1, 1), padding=1, groups=grp)
        err = ((h.double() - ref).norm() / ref.norm()).item()
        worst = max(worst, err)
        t_c = timed(lambda i: F.conv2d(xs[i].view(n * grp, -1, s, s), d, padding=1))
        t_t = timed(lambda i: lowrank._taps_down(spec, xcl[i], d, grp))
        tot.setdefault("lokr", [0.0, 0.0])
        tot["lokr"][0] += t_c
        tot["lokr"][1] += t_t
        print(f"grouped 8 r16 {n}x{c}x{s}x{s}  err {err:.1e}  cuDNN (folded) {t_c:7.1f} us  GEMM+tap sum {t_t:7.1f} us",
              flush=True)
    for rank, (c_, t_) in tot.items():
        print(f"rank {rank}: summed over the shapes cuDNN {c_:.1f} us, GEMM+tap sum {t_:.1f} us")
    print(f"worst relative error {worst:.2e} (tolerance {a.tol})")
    return 0 if worst <= a.tol else 1


if __name__ == "__main__":
    sys.exit(main())

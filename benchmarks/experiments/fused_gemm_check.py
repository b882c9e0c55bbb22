#!/usr/bin/env python3
"""The fused low-rank GEMM (``lyco/algorithms/lowrank_gemm.py``: ``y = x·Wᵀ + b + s·(x·Dᵀ)·Uᵀ`` and h in one Triton
launch) on the GPU — issue 7, NOTES change 91: per SD1.5 b8 linear shape, its relative error against float64 (y and h,
h written into a NaN-poisoned column slice, every element checked), then device time per call as CUDA-graph replays
over four input sets in turn (so x is not served from L2): the fused kernel, the bypass op's three kernels (cuBLAS's
frozen GEMM, the thin down GEMM, the in-place up), and cuBLAS's frozen GEMM alone.

    python benchmarks/experiments/fused_gemm_check.py     # exit 1 if a relative error exceeds --tol
    python benchmarks/experiments/fused_gemm_check.py --shapes other     # SDXL b4/b1 and SD1.5 b1 shapes (run 160)
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from lyco.algorithms import lowrank_gemm  # noqa: E402

# (rows, in, out, bias): SD1.5 b8's linear shapes the rule takes, and two it leaves out (2048 rows; 5120 out)
SHAPES = [(32768, 320, 320, False), (32768, 320, 320, True), (32768, 1280, 320, True), (8192, 640, 640, False),
          (8192, 640, 640, True), (2048, 1280, 1280, False), (8192, 640, 5120, True)]
# --shapes other: the linear shapes of SDXL b4 and b1 at 1024 px and of SD1.5 b1 — the rule leaves most of them out
# (fewer than 8192 rows or wider than 640 out); timed to see whether it should take them (session 21)
OTHER_SHAPES = [(4096, 1280, 1280, False), (4096, 1280, 1280, True), (4096, 5120, 1280, True),
                (4096, 1280, 10240, True), (16384, 640, 640, False), (16384, 640, 640, True),
                (16384, 2560, 640, True), (16384, 640, 5120, True), (1024, 1280, 1280, False),
                (4096, 640, 640, False), (4096, 320, 320, False), (1024, 640, 640, False), (256, 1280, 1280, False)]


def rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def timed(fn, reps=20):
    """µs per call: ``fn(i)`` for the four input sets captured in one graph, replayed ``reps`` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(4):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(4):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps / 4)
    return sorted(times)[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tol", type=float, default=1e-2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--shapes", default="sd15b8", choices=("sd15b8", "other"),
                    help="SD1.5 b8's shapes (default) or those of SDXL b4/b1 and SD1.5 b1")
    ap.add_argument("--sweep", metavar="FILE", help="time every configuration (sweep) and write the best to FILE")
    args = ap.parse_args()
    dev, dt, r, s = "cuda", torch.bfloat16, args.rank, 0.5
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "usable:", lowrank_gemm.usable(
        torch.empty(1, device=dev, dtype=dt)))
    bad = False
    for m, k, n, bias in (SHAPES if args.shapes == "sd15b8" else OTHER_SHAPES):
        g = torch.Generator(device=dev).manual_seed(m + k + n)
        xs = [torch.randn(m, k, device=dev, dtype=dt, generator=g) for _ in range(4)]
        w = (torch.randn(n, k, device=dev, dtype=dt, generator=g) / k ** 0.5).contiguous()
        d = torch.randn(r, k, device=dev, dtype=dt, generator=g) / k ** 0.5
        u = torch.randn(n, r, device=dev, dtype=dt, generator=g) / r ** 0.5
        b = torch.randn(n, device=dev, dtype=dt, generator=g) if bias else None
        hbuf = torch.full((m, 3 * r), float("nan"), device=dev, dtype=dt)
        hs = hbuf[:, r:2 * r]
        assert lowrank_gemm.supports(xs[0], w, b, d, u, hs)
        y, h = lowrank_gemm.fused_linear(xs[0], w, b, d, u, s, hs)
        x64 = xs[0].double()
        h_ref = x64 @ d.double().t()
        y_ref = x64 @ w.double().t() + s * h_ref @ u.double().t() + (b.double() if bias else 0)
        errs = (rel(y, y_ref), rel(h, h_ref))
        written = not torch.isnan(hs).any().item() and torch.isnan(hbuf[:, :r]).all().item() and \
            torch.isnan(hbuf[:, 2 * r:]).all().item() and not torch.isnan(y).any().item()
        bad |= max(errs) > args.tol or not written
        # the bypass op's cuBLAS form on the same inputs, for its own error against float64
        h3 = F.linear(xs[0], d)
        y3 = F.linear(xs[0], w, b)
        y3.addmm_(h3, u.t(), alpha=s)
        hb = [torch.empty(m, r, device=dev, dtype=dt) for _ in range(4)]

        def fused(i):
            lowrank_gemm.fused_linear(xs[i], w, b, d, u, s, hb[i])

        def three(i):
            hh = F.linear(xs[i], d)
            yy = F.linear(xs[i], w, b)
            yy.addmm_(hh, u.t(), alpha=s)

        def plain(i):
            F.linear(xs[i], w, b)

        t = {name: timed(fn) for name, fn in (("fused", fused), ("three", three), ("cublas", plain))}
        print(f"{m}x{k}->{n} bias={bias}: rel err y {errs[0]:.2e} (cuBLAS form {rel(y3, y_ref):.2e}) h {errs[1]:.2e} "
              f"written={written} | µs fused {t['fused']:.1f} three-kernel {t['three']:.1f} "
              f"cuBLAS alone {t['cublas']:.1f} | fused/three {t['fused'] / t['three']:.2f}")
    print("FAIL" if bad else "all within tolerance")
    if args.sweep:
        sweep(dev, dt, r, s, args.sweep)
    sys.exit(1 if bad else 0)


CONFIGS = [(128, 128, 64, 4, 8), (128, 64, 64, 4, 4), (128, 64, 64, 5, 4), (128, 64, 64, 4, 8), (128, 256, 64, 3, 8),
           (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 64, 3, 8), (128, 128, 128, 3, 8), (256, 64, 64, 3, 8),
           (128, 64, 128, 3, 4), (64, 256, 64, 3, 8)]


def sweep(dev, dt, r, s, path):
    """Every configuration of :data:`CONFIGS` on the shapes the rule takes, as ``fused_linear`` picks it by rows (the
    many-row one for 32768 rows, the other for 8192): µs per shape, the best per class by the layers' counts in
    SD1.5 b8 (32768 × 320 → 320: 30 layers, with a bias 10 of them; 32768 × 1280 → 320: 5; 8192 × 640 → 640: 30),
    written to ``path`` as ``LYCO_FUSED_GEMM_CFG``."""
    classes = {"large": [(32768, 320, 320, False, 20), (32768, 320, 320, True, 10), (32768, 1280, 320, True, 5)],
               "small": [(8192, 640, 640, False, 20), (8192, 640, 640, True, 10)]}
    best = {}
    for cls, shapes in classes.items():
        totals = []
        for cfg in CONFIGS:
            os.environ["LYCO_FUSED_GEMM_CFG"] = "/".join([",".join(map(str, cfg))] * 2)
            total, parts = 0.0, []
            try:
                for m, k, n, bias, count in shapes:
                    g = torch.Generator(device=dev).manual_seed(m + k + n)
                    xs = [torch.randn(m, k, device=dev, dtype=dt, generator=g) for _ in range(4)]
                    w = torch.randn(n, k, device=dev, dtype=dt, generator=g) / k ** 0.5
                    d = torch.randn(r, k, device=dev, dtype=dt, generator=g) / k ** 0.5
                    u = torch.randn(n, r, device=dev, dtype=dt, generator=g) / r ** 0.5
                    b = torch.randn(n, device=dev, dtype=dt, generator=g) if bias else None
                    y, _ = lowrank_gemm.fused_linear(xs[0], w, b, d, u, s)
                    ref = F.linear(xs[0], w, b).float() + s * (F.linear(xs[0], d).float() @ u.float().t())
                    if rel(y, ref.double()) > 2e-2:
                        raise RuntimeError(f"wrong result at {m}x{k}->{n}")
                    hb = [torch.empty(m, r, device=dev, dtype=dt) for _ in range(4)]
                    t = timed(lambda i: lowrank_gemm.fused_linear(xs[i], w, b, d, u, s, hb[i]))
                    parts.append(f"{t:.1f}")
                    total += t * count
            except Exception as exc:  # a configuration Triton cannot compile (shared memory): skipped
                print(f"sweep {cls} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            totals.append((total, cfg))
            print(f"sweep {cls} {cfg}: µs {' '.join(parts)} | weighted {total / 1e3:.3f} ms")
        best[cls] = min(totals)[1]
        print(f"sweep {cls}: best {best[cls]} ({min(totals)[0] / 1e3:.3f} ms; default "
              f"{dict((c, t) for t, c in totals).get(lowrank_gemm._CFG_LARGE if cls == 'large' else lowrank_gemm._CFG_SMALL, float('nan')) / 1e3:.3f})")
    os.environ.pop("LYCO_FUSED_GEMM_CFG", None)
    with open(path, "w") as f:
        f.write(f"export LYCO_FUSED_GEMM_CFG={','.join(map(str, best['large']))}/{','.join(map(str, best['small']))}\n")


if __name__ == "__main__":
    main()

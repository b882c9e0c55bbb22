#!/usr/bin/env python3
"""The fused low-rank Triton GEMM experiment (``experiments/lowrank_gemm_triton.py``) against cuBLAS at
the SD1.5 b8 shapes of the `lin` layer set (bf16, rank 16), as device time (each variant captured as a
CUDA graph and replayed): one layer's forward + backward alone (the floor) and with LoRA on the delta
path (plain autograd, cuBLAS), and the forward product alone — cuBLAS ``F.linear`` against the fused
kernel (which also adds the adapter). Checks the kernel on the device against fp32 math first; with
``--sweep`` times it over tile configurations. (Run 11 also timed the kernel inside a whole-layer
autograd op, since removed from the library: ``results/run11_h200_kernel/``.)

    python benchmarks/kernel_bench.py [--out DIR] [--sweep]
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "experiments"))
import lowrank_gemm_triton as lg  # noqa: E402
sys.path.insert(0, os.path.dirname(__file__))
from _common import capture_graph  # noqa: E402

# (M, K, N): batch 8 × tokens, in, out — attention at 64², 32², 16², 8²; cross-attention k/v; GEGLU
# proj (×2 out) and ff out
SHAPES = [(32768, 320, 320), (32768, 320, 2560), (32768, 1280, 320), (8192, 640, 640), (8192, 640, 5120),
          (8192, 2560, 640), (2048, 1280, 1280), (2048, 1280, 10240), (2048, 5120, 1280), (512, 1280, 1280),
          (616, 768, 320), (616, 768, 1280)]


def graph_time(fn, reps=20):
    g = capture_graph(fn, warmup=3)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / reps * 1000  # µs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args()
    dev, dt, r = "cuda", torch.bfloat16, a.rank
    torch.manual_seed(0)
    rows = []
    # correctness on the device: the kernel against fp32 math
    for m, k, n in [(1000, 320, 640), (77, 768, 320)]:
        x, w, d, u, b = (torch.randn(*s, device=dev) * sc for s, sc in
                         [((m, k), 1), ((n, k), k ** -0.5), ((r, k), k ** -0.5), ((n, r), 0.5), ((n,), 1)])
        c, h = lg.lowrank_gemm(x.to(dt), w.to(dt).t(), d.to(dt).t(), u.to(dt).t(), 0.7, b.to(dt), want_h=True)
        ref = x @ w.t() + b + 0.7 * (x @ d.t()) @ u.t()
        err = float((c.float() - ref).norm() / ref.norm())
        herr = float((h.float() - x @ d.t()).norm() / (x @ d.t()).norm())
        print(f"check {m}x{k}x{n}: rel err C {err:.1e}, H {herr:.1e}", flush=True)
        assert err < 1e-2 and herr < 1e-2
    for m, k, n in SHAPES:
        mod = torch.nn.Linear(k, n, device=dev, dtype=dt)
        mod.requires_grad_(False)
        x = torch.randn(m, k, device=dev, dtype=dt, requires_grad=True)
        down = (torch.randn(r, k, device=dev) * k ** -0.5).to(dt).requires_grad_(True)
        up = (torch.randn(n, r, device=dev) * 0.1).to(dt).requires_grad_(True)
        gy = torch.randn(m, n, device=dev, dtype=dt)

        def floor():
            torch.autograd.grad(F.linear(x, mod.weight, mod.bias), [x], gy)

        def op():
            y = F.linear(x, mod.weight, mod.bias) + 0.5 * F.linear(F.linear(x, down), up)
            torch.autograd.grad(y, [x, down, up], gy)

        def fwd_cublas():
            F.linear(x.detach(), mod.weight, mod.bias)

        def fwd_kernel():
            lg.lowrank_gemm(x.detach(), mod.weight.t(), down.detach().t(), up.detach().t(), 0.5, mod.bias, want_h=True)

        rec = {"M": m, "K": k, "N": n, "r": r}
        rec["floor_us"] = graph_time(floor)
        rec["torch_us"] = graph_time(op)
        rec["fwd_cublas_us"] = graph_time(fwd_cublas)
        rec["fwd_kernel_us"] = graph_time(fwd_kernel)
        if a.sweep:
            best = None
            orig = lg._config
            for bm, bn, bk, wp, st in [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 256, 64, 8, 3),
                                       (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (256, 128, 64, 8, 3),
                                       (128, 128, 32, 4, 4)]:
                lg._config = lambda m_, n_, c=(bm, bn, bk, wp, st): c
                try:
                    t = graph_time(fwd_kernel)
                except Exception as e:  # noqa: BLE001 - a config that does not fit
                    t = float("inf")
                    print("  config failed", (bm, bn, bk, wp, st), type(e).__name__, flush=True)
                rec[f"cfg_{bm}x{bn}x{bk}_w{wp}_s{st}"] = t
                if best is None or t < best[0]:
                    best = (t, (bm, bn, bk, wp, st))
            lg._config = orig
            rec["best_cfg"] = best[1]
        rows.append(rec)
        print(json.dumps({k_: (round(v, 1) if isinstance(v, float) else v) for k_, v in rec.items()}), flush=True)
    tot = {k_: sum(r_[k_] for r_ in rows) for k_ in ("floor_us", "torch_us", "fwd_cublas_us", "fwd_kernel_us")}
    print("sum over shapes:", {k_: round(v, 1) for k_, v in tot.items()})
    print(f"LoRA over the floor (fwd+bwd, cuBLAS): {tot['torch_us'] - tot['floor_us']:.1f} µs; forward product: "
          f"fused kernel ÷ cuBLAS = {tot['fwd_kernel_us'] / tot['fwd_cublas_us']:.2f}")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "kernel_bench.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": __import__("triton").__version__, "rows": rows, "sum": tot,
                   "time": time.strftime("%Y-%m-%d %H:%M")}, f, indent=1)


if __name__ == "__main__":
    main()

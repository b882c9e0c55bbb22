#!/usr/bin/env python3
"""Host time per call of the Triton kernels in ``lyco/algorithms/lowrank_triton.py`` against the torch ops they
replace, on a small layer (320×320, rank 16, bf16: device time a few µs, so the loop is host-bound and the
time per call is the launch path's cost). Eager training pays this per layer and step; a CUDA graph does not.

    python benchmarks/launch_bench.py [--out DIR]
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from lyco.algorithms import lowrank_triton as K  # noqa: E402
from lyco.algorithms.dora import _LoraDoraBuild  # noqa: E402


def per_call_us(fn, n=400):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    a = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    m = k = 320
    w = torch.randn(m, k, device=dev, dtype=dt)
    u = torch.randn(m, 16, device=dev, dtype=dt)
    d = torch.randn(16, k, device=dev, dtype=dt)
    mag = torch.rand(m, device=dev) + 0.5
    e = torch.randn(m, k, device=dev, dtype=dt)
    res = {
        "addmm (GLoRA torch path)": per_call_us(lambda: torch.addmm(w, u, d, alpha=0.5)),
        "add_lowrank (GLoRA Triton)": per_call_us(lambda: K.add_lowrank(w, u, d, 0.5)),
    }
    for path, env in (("torch path", "0"), ("Triton", "1")):
        os.environ["LYCO_TRITON"] = env  # read by the build at its forward (lowrank_triton.usable)
        b = _LoraDoraBuild(0.5, 1.0, False)
        res[f"DoRA forward build, {path}"] = per_call_us(lambda: b.forward_aux(w, None, u, d, mag))
        keep = b.forward_aux(w, None, u, d, mag)[2]

        def bwd():
            _, aux = b.recompute(keep, w, None, u, d, mag)
            b.vjp(aux, (u, d, mag), e, None, (True, True, True))
        res[f"DoRA backward (rebuild + vjp), {path}"] = per_call_us(bwd)
    del os.environ["LYCO_TRITON"]
    for name, us in res.items():
        print(f"{name:45s} {us:7.1f} µs per call")
    out = {"device": torch.cuda.get_device_name(), "shape": [m, k], "rank": 16, "us_per_call": res}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "launch_bench.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

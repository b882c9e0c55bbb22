#!/usr/bin/env python3
"""DoRA's fused Triton kernels (``lyco/algorithms/lowrank_triton.py``) over the weights of the benchmark's DoRA
layer set (SD1.5's 192 ``lin`` layers, bf16, rank 16), per launch configuration, as device time per training
step: the forward build with its norms, the backward's rebuild and the backward kernel, every layer once,
captured as one CUDA graph and replayed. Prints each configuration's time against the bytes it must move at the
measured copy bandwidth, and checks every configuration against fp32 math on the device first.

    python benchmarks/dora_kernel_bench.py [--out DIR]
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from _common import graph_us  # noqa: E402
from train_step import build_unet, layer_sets  # noqa: E402

from lyco.algorithms import lowrank_triton as K  # noqa: E402

#: launch configurations (``lowrank_triton._CFG``); "programs" in units of the card's SM count ("rows": whole rows per
#: program, no column split — the first kernels of run 38)
CONFIGS = {
    "bk128-w4-p4": dict(BK=128, num_warps=4, programs=4),
    "bk256-w4-p4": dict(BK=256, num_warps=4, programs=4),
    "bk256-w8-p4": dict(BK=256, num_warps=8, programs=4),
    "bk256-w4-p2": dict(BK=256, num_warps=4, programs=2),
    "bk256-w4-p8": dict(BK=256, num_warps=4, programs=8),
    "bk128-w4-p8": dict(BK=128, num_warps=4, programs=8),
    "bk256-w4-p4-s2": dict(BK=256, num_warps=4, programs=4, num_stages=2),
    "bk256-w4-rows": dict(BK=256, num_warps=4, programs="rows"),
    # 32 / 64 rows per block: fewer re-reads of D (one per row block), wgmma-sized dots at 64 (run 41)
    "bm32-bk128-w4-p4": dict(BM=32, BK=128, num_warps=4, programs=4),
    "bm64-bk128-w4-p4": dict(BM=64, BK=128, num_warps=4, programs=4),
    "bm64-bk64-w4-p4": dict(BM=64, BK=64, num_warps=4, programs=4),
    "bm64-bk128-w8-p4": dict(BM=64, BK=128, num_warps=8, programs=4),
    "bm64-bk128-w4-p8": dict(BM=64, BK=128, num_warps=4, programs=8),
}
DEFAULT = dict(K._CFG)


def graph_ms(fn, reps=10):
    """Median ms of one ``fn()`` as a CUDA graph replayed ``reps`` times (``_common.graph_us``)."""
    return graph_us(fn, 1, replays=reps) / 1000.0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--rank", type=int, default=16)
    a = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    unet = build_unet("sd15", False, dev, dt)
    mods = dict(unet.named_modules())
    g = torch.Generator(device="cpu").manual_seed(0)
    layers = []
    for name in layer_sets(unet)["lin"]:
        w = mods[name].weight.detach()
        w2 = w.reshape(w.shape[0], -1)
        m, k = w2.shape
        up = (0.05 * torch.randn(m, a.rank, generator=g)).to(dev, dt)
        down = (0.05 * torch.randn(a.rank, k, generator=g)).to(dev, dt)
        mag = (w2.float().norm(dim=1) * (1 + 0.1 * torch.randn(m, generator=g).to(dev))).contiguous()
        e = (1e-3 * torch.randn(m, k, generator=g)).to(dev, dt)
        layers.append((w2, up, down, mag, e))
    del unet
    nbytes = sum(w2.numel() for w2, *_ in layers) * 2
    # bytes each pass must move: forward build R W + W W_eff (the norm sweep's re-read of W is from L2 at
    # best), rebuild R W + W W_eff, backward R E, R W (dgr sweep) + R E, R W, W H
    moved = nbytes * (2 + 2 + 5)
    x = torch.empty(nbytes // 2, device=dev, dtype=dt)
    y = torch.empty_like(x)
    copy_ms = graph_ms(lambda: y.copy_(x))
    bw = 2 * nbytes / copy_ms / 1e6  # GB/s
    print(f"{len(layers)} layers, {nbytes / 2**20:.0f} MiB of bf16 weights; copy {bw:.0f} GB/s; "
          f"ideal (bytes / copy bandwidth) {moved / bw / 1e6:.2f} ms per step", flush=True)
    results = {"layers": len(layers), "weight_mib": nbytes / 2**20, "copy_GBps": bw,
               "ideal_ms": moved / bw / 1e6, "device": torch.cuda.get_device_name(), "configs": {}}

    def step(which):
        def run():
            for w2, up, down, mag, e in layers:
                if which in ("all", "fwd"):
                    _, vec = K.build(w2, up, down, 0.75, 1.0, mag=mag)
                if which in ("all", "rebuild"):
                    K.build(w2, up, down, 0.75, 1.0, vec=vecs[id(w2)])
                if which in ("all", "bwd"):
                    K.backward(e, w2, up, down, vecs[id(w2)], 0.75, 1.0, False, True, torch.float32)
        return run

    for cname, cfg in CONFIGS.items():
        K._CFG.clear()
        K._CFG.update(DEFAULT)
        K._CFG.update({k: v for k, v in cfg.items() if k != "programs"})
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        K._CFG["programs"] = 1 if cfg["programs"] == "rows" else cfg["programs"] * sms
        # check one layer of each distinct shape against fp32 math
        worst, seen, vecs = 0.0, set(), {}
        for w2, up, down, mag, e in layers:
            out, vecs[id(w2)] = K.build(w2, up, down, 0.75, 1.0, mag=mag)
            if w2.shape in seen:
                continue
            seen.add(w2.shape)
            wc = w2.float() + 0.75 * up.float() @ down.float()
            ref = wc * (mag / (wc.norm(dim=1) + K._EPS))[:, None]
            worst = max(worst, ((out.float() - ref).abs().max() / ref.abs().max()).item())
        ms = {w: graph_ms(step(w)) for w in ("fwd", "rebuild", "bwd", "all")}
        results["configs"][cname] = dict(cfg=cfg, ms=ms, max_rel_err=worst)
        print(f"{cname:26s} fwd {ms['fwd']:.2f}  rebuild {ms['rebuild']:.2f}  bwd {ms['bwd']:.2f}  "
              f"all {ms['all']:.2f} ms  ({ms['all'] / results['ideal_ms']:.2f}x ideal)  err {worst:.1e}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "dora_kernel_bench.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

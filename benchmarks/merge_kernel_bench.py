#!/usr/bin/env python3
"""The bypass op's merge kernel (``lowrank_triton.add_lowrank``: ``W′ = W + s·U·D`` in one read of W and one write,
``[W′ | U]`` on the wide layers) over the weights of the benchmark's layer sets, per launch configuration
(``lowrank_triton._MERGE_CFG``), as device time per training step: every layer's merge once, captured
as one CUDA graph and replayed —

* **alone**: the merges in a row on one stream;
* **beside**: the same graph with a chain of cuBLAS GEMMs on a second stream (1024 × 1280 × 1280, as SDXL b1's
  ∂x GEMMs: the captured step builds its merges ahead on a side stream beside such kernels, issue 7 session 22's
  timeline), the span and how much the merges added to the GEMMs' own time.

Each configuration is checked against fp32 math on the device first (one layer of each distinct shape).

    python benchmarks/merge_kernel_bench.py [--models sdxl,sd15] [--out DIR]
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from _common import graph_us  # noqa: E402
from train_step import MODELS, layer_sets  # noqa: E402

from lyco.algorithms import lowrank_triton as K  # noqa: E402
from lyco.models import configs  # noqa: E402

#: launch configurations; "programs" in units of the card's SM count
CONFIGS = {
    "bm16-bk128-w4-s3-p4": dict(BM=16, BK=128, num_warps=4, num_stages=3, programs=4),  # DoRA's _CFG (run 40)
    "bm16-bk256-w4-s3-p4": dict(BM=16, BK=256, num_warps=4, num_stages=3, programs=4),
    "bm32-bk128-w4-s3-p4": dict(BM=32, BK=128, num_warps=4, num_stages=3, programs=4),
    "bm32-bk128-w4-s3-p2": dict(BM=32, BK=128, num_warps=4, num_stages=3, programs=2),
    "bm32-bk256-w4-s3-p2": dict(BM=32, BK=256, num_warps=4, num_stages=3, programs=2),
    "bm32-bk256-w8-s3-p2": dict(BM=32, BK=256, num_warps=8, num_stages=3, programs=2),
    "bm64-bk128-w4-s3-p2": dict(BM=64, BK=128, num_warps=4, num_stages=3, programs=2),
    "bm64-bk128-w4-s3-p1": dict(BM=64, BK=128, num_warps=4, num_stages=3, programs=1),
    "bm64-bk256-w8-s2-p1": dict(BM=64, BK=256, num_warps=8, num_stages=2, programs=1),
    "bm64-bk64-w4-s4-p2": dict(BM=64, BK=64, num_warps=4, num_stages=4, programs=2),
    "bm128-bk128-w8-s2-p1": dict(BM=128, BK=128, num_warps=8, num_stages=2, programs=1),
    "bm32-bk128-w4-s1-p2": dict(BM=32, BK=128, num_warps=4, num_stages=1, programs=2),
}


def span_ms(fn) -> float:
    """Median ms of ``fn()`` captured as one CUDA graph and replayed 15 times (``_common.graph_us``)."""
    return graph_us(fn, 1, replays=15) / 1000.0


def layers_of(model: str, which: str, rank: int, dev, dt):
    """``(W, U, D, with_up)`` per layer of ``which`` (``lin`` at ``rank``, ``conv`` flattened), random values."""
    unet = configs.build_unet(MODELS[model]["family"])  # meta: names and shapes
    mods = dict(unet.named_modules())
    g = torch.Generator(device=dev).manual_seed(0)
    out = []
    for name in layer_sets(unet)[which]:
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            continue  # their input (the text states) takes no gradient in the benchmark's step: no merge there
        m, k = mods[name].weight.shape[0], mods[name].weight[0].numel()
        w = torch.randn(m, k, generator=g, device=dev, dtype=dt)
        u = 0.05 * torch.randn(m, rank, generator=g, device=dev, dtype=dt)
        d = 0.05 * torch.randn(rank, k, generator=g, device=dev, dtype=dt)
        wide = which == "lin" and m >= 2 * (k + rank) and (k + rank) % 8 == 0  # lowrank._cat_pays
        out.append((w, u, d, wide))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sdxl,sd15")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default=".")
    a = p.parse_args()
    unknown = [c for c in a.configs.split(",") if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    dev, dt = torch.device("cuda"), torch.bfloat16
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    default = dict(K._MERGE_CFG)
    results = {"device": torch.cuda.get_device_name(), "sets": {}}
    xg = torch.randn(1024, 1280, device=dev, dtype=dt)
    wg = torch.randn(1280, 1280, device=dev, dtype=dt)
    for model in a.models.split(","):
        for which, rank in (("lin", 16), ("conv", 8)):
            layers = layers_of(model, which, rank, dev, dt)
            nbytes = sum(w.numel() * 2 * 2 for w, *_ in layers)  # read W, write W′
            key = f"{model}:{which}:r{rank}"
            res = results["sets"][key] = {"layers": len(layers), "moved_mib": nbytes / 2**20, "configs": {}}
            n_gemm = None
            print(f"== {key}: {len(layers)} merges, {nbytes / 2**20:.0f} MiB moved", flush=True)
            for cname in a.configs.split(","):
                cfg = CONFIGS[cname]
                K._MERGE_CFG.clear()
                K._MERGE_CFG.update(default)
                K._MERGE_CFG.update({k: v for k, v in cfg.items() if k != "programs"})
                K._MERGE_CFG["programs"] = cfg["programs"] * sms
                worst, seen = 0.0, set()
                for w, u, d, wide in layers:
                    if (w.shape, wide) in seen:
                        continue
                    seen.add((w.shape, wide))
                    o = K.add_lowrank(w, u, d, 0.75, with_up=wide)
                    ref = w.float() + 0.75 * u.float() @ d.float()
                    worst = max(worst, ((o[:, :w.shape[1]].float() - ref).abs().max() / ref.abs().max()).item())
                    if wide and not torch.equal(o[:, w.shape[1]:], u):
                        worst = float("inf")

                def merges():
                    for w, u, d, wide in layers:
                        K.add_lowrank(w, u, d, 0.75, with_up=wide)
                alone = span_ms(merges)
                if n_gemm is None:  # the GEMM chain about as long as the first configuration's merges
                    one = span_ms(lambda: [xg @ wg for _ in range(50)]) / 50
                    n_gemm = max(1, round(alone / one))
                    gemms_ms = span_ms(lambda: [xg @ wg for _ in range(n_gemm)])
                    res["gemms"], res["gemms_ms"] = n_gemm, gemms_ms

                def both():
                    s2 = torch.cuda.Stream()
                    s2.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s2):
                        for _ in range(n_gemm):
                            xg @ wg
                    merges()
                    torch.cuda.current_stream().wait_stream(s2)
                beside = span_ms(both)
                res["configs"][cname] = dict(cfg=cfg, alone_ms=alone, beside_ms=beside, max_rel_err=worst)
                print(f"  {cname:22s} alone {alone:6.3f} ms ({nbytes / alone / 1e6:5.0f} GB/s)  beside "
                      f"{n_gemm} GEMMs ({res['gemms_ms']:.3f} ms alone): span {beside:6.3f}, "
                      f"+{beside - res['gemms_ms']:.3f}  err {worst:.1e}", flush=True)
            del layers
            torch.cuda.empty_cache()
    K._MERGE_CFG.clear()
    K._MERGE_CFG.update(default)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "merge_kernel_bench.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Extraction math on the GPU: lyco's per-layer LoRA/LoCon extraction against LyCORIS 4.1.3's, on the same
weight differences of every Linear/Conv layer of an SD1.5- or SDXL-sized UNet (real configs).

``lyco extract`` and LyCORIS's ``extract_diff`` differ in everything around the math (file formats, key
names, which layers); this times the part that costs: per layer, ΔW → rank-r factors moved to the CPU in
fp16 (what both then write). lyco: ``lyco.tools.extract._lora_layer`` (randomised SVD, exact for small
layers; the relative error of the stored factors computed on the device); LyCORIS:
``lycoris.utils.extract_linear`` / ``extract_conv`` (a full ``torch.linalg.svd`` per layer) in mode
"fixed". Both on the same ΔW in fp32 on the device:

    ΔW = A·diag(0.9^i)·B·s + ε·N    (A, B Gaussian of inner size 64, s and ε scaled to ‖W‖; N Gaussian)

— a decaying spectrum with a noise floor, like a fine-tune's difference. Per layer: wall time (CUDA
synchronised), and each side's relative Frobenius error ‖ΔW − up·down‖/‖ΔW‖ of its fp16 factors; the
exact truncated SVD's error is the reference (Eckart–Young: nobody can do better at that rank).

    python benchmarks/extract_bench.py --model sd15 --rank 16 --out DIR     (--smoke: tiny UNet on the CPU)

Writes ``extract_bench.json`` and ``.md`` (card named) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine_info  # noqa: E402

FAMILY = {"sd15": "sd1", "sdxl": "sdxl"}


def layer_shapes(model: str, smoke: bool) -> list[tuple[str, tuple[int, ...]]]:
    from lyco.models import configs
    fam = FAMILY[model]
    if smoke:
        from lyco.models import tiny
        unet = configs.build_from_config(tiny.tiny_configs(fam)["unet"], device="meta")
    else:
        unet = configs.build_unet(fam, device="meta", dtype=torch.float16)
    return [(n, tuple(m.weight.shape)) for n, m in unet.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))]


def make_delta(shape, i: int, device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(1000 + i)
    out, rest = shape[0], math.prod(shape[1:])
    k = min(64, out, rest)
    a = torch.randn(out, k, generator=g)
    b = torch.randn(k, rest, generator=g)
    decay = 0.9 ** torch.arange(k, dtype=torch.float32)
    low = (a * decay) @ b / (out * rest) ** 0.5
    noise = torch.randn(out, rest, generator=g) * (0.02 * float(low.norm()) / (out * rest) ** 0.5)
    return (low + noise).reshape(shape).to(device)


def rel_err(dw2: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    return float((dw2 - up.float() @ down.float()).norm() / dw2.norm())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_lyco(dw, shape, rank):
    from lyco.tools.extract import _lora_layer
    r = _lora_layer(dw, shape, "rank", rank, 1 << 30, False, 0.5, False, torch.float16)
    return r.kind, r.tensors


def run_lycoris(dw, shape, rank):
    from lycoris.utils import extract_conv, extract_linear
    dev = str(dw.device)
    if len(shape) == 4:
        res, kind = extract_conv(dw, "fixed", rank, dev)
    else:
        res, kind = extract_linear(dw, "fixed", rank, dev)
    if kind == "full":
        return "full", {"diff": res.half().cpu()}
    a, b, _ = res
    return "lora", {"lora_down.weight": a.half().cpu(), "lora_up.weight": b.half().cpu()}


def factors_err(kind, t, dw2) -> float:
    if kind == "full":
        return float((dw2 - t["diff"].float().to(dw2.device).reshape(dw2.shape)).norm() / dw2.norm())
    up = t["lora_up.weight"].to(dw2.device).reshape(dw2.shape[0], -1)
    down = t["lora_down.weight"].to(dw2.device).reshape(up.shape[1], -1)
    return rel_err(dw2, up, down)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python benchmarks/extract_bench.py --model sd15 --rank 16 --out results/extract\n"
               "  python benchmarks/extract_bench.py --smoke --rank 2 --limit 20 --out /tmp/eb   (CPU, tiny UNet)")
    ap.add_argument("--model", default="sd15", choices=sorted(FAMILY))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="tiny UNet on the CPU")
    ap.add_argument("--limit", type=int, default=0, help="only the first N layers (0: all)")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    shapes = layer_shapes(args.model, args.smoke)
    if args.limit:
        shapes = shapes[:args.limit]
    libs = {"lyco": run_lyco, "lycoris": run_lycoris}
    # warm-up (cuSOLVER/cuBLAS handles, the randomised path and the exact one)
    for i, (_, shape) in enumerate(shapes[:4]):
        dw = make_delta(shape, i, device)
        for fn in libs.values():
            fn(dw, shape, args.rank)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for i, (name, shape) in enumerate(shapes):
        dw = make_delta(shape, i, device)
        dw2 = dw.reshape(shape[0], -1)
        row = {"layer": name, "shape": list(shape)}
        for lib, fn in libs.items():
            sync(device)
            t0 = time.perf_counter()
            kind, t = fn(dw, shape, args.rank)
            sync(device)
            row[f"{lib}_ms"] = (time.perf_counter() - t0) * 1e3
            row[f"{lib}_kind"] = kind
            row[f"{lib}_err"] = factors_err(kind, t, dw2)
        s = torch.linalg.svdvals(dw2.double())
        r = min(args.rank, s.numel())
        row["best_err"] = float((s[r:].square().sum() / s.square().sum()).sqrt())
        rows.append(row)
        print(f"{name:60s} {str(shape):22s} lyco {row['lyco_ms']:8.1f} ms err {row['lyco_err']:.5f} | "
              f"lycoris {row['lycoris_ms']:8.1f} ms err {row['lycoris_err']:.5f} | best {row['best_err']:.5f}",
              flush=True)
    tot = {lib: sum(r[f"{lib}_ms"] for r in rows) for lib in libs}
    def median_excess(lib):
        xs = [r[f"{lib}_err"] / r["best_err"] - 1 for r in rows if r[f"{lib}_kind"] == "lora" and r["best_err"] > 0]
        return statistics.median(xs) if xs else float("nan")

    excess = {lib: median_excess(lib) for lib in libs}
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    meta = machine_info("gpu", "cpu", "torch", "lycoris")
    meta.update(model=args.model, rank=args.rank, layers=len(rows), device=str(device), smoke=args.smoke)
    summary = {"total_ms": tot, "ratio_lyco_to_lycoris": tot["lyco"] / tot["lycoris"],
               "median_err_excess_over_best": excess, "peak_gib": peak}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "extract_bench.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    card = meta.get("gpu") or meta.get("cpu")
    md = [f"# Extraction math per layer — {card}", "",
          f"{args.model} UNet, {len(rows)} Linear/Conv layers, rank {args.rank}, ΔW in fp32 on {device} "
          f"(decaying spectrum + noise floor); factors to the CPU in fp16. torch {meta['torch']}, "
          f"lycoris-lora {meta['lycoris']}.", "",
          "| | lyco (randomised SVD) | LyCORIS 4.1.3 (full SVD) |", "|---|---|---|",
          f"| total ms | {tot['lyco']:.0f} | {tot['lycoris']:.0f} |",
          f"| lyco ÷ LyCORIS | {tot['lyco'] / tot['lycoris']:.3f} | |",
          f"| median error excess over the exact truncation | {excess['lyco']:.2e} | {excess['lycoris']:.2e} |",
          f"| peak GPU memory (both, GiB) | {peak if peak is None else round(peak, 2)} | |", ""]
    (out / "extract_bench.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""LoKr full-matrix's factor gradients on a linear layer: through ∂W′ against straight from ∂y and x (issue 7,
session 46, NOTES change 173) — in the row form (the library's) and (session 47) the permuted one (here: NOTES change
180, taken out of the library after run 334) — per layer shape.

The rebuilt op's path: ``∂W′ = ∂yᵀ·x`` (one bf16 GEMM) and its two reductions (``factor_triton.kron_weight_grads``);
the direct form: ``lyco.algorithms.lokr.kron_linear_grads``. For the linear layers of SD1.5 (512 px) and SDXL
(1024 px) at factor 8 — rows as each level has them at batch 1, times the batch — µs a call (10 calls in one CUDA
graph, median of 7 replays), their ratio, and the rows over the layer's harmonic width ``out·in/(out + in)`` (the
measure ``LYCO_LOKR_DIRECT_ROWS`` compares with), after checking the two against each other (relative to the
largest entry). One JSON line per shape, and all of them in ``--out``.

    PYTHONPATH=src python benchmarks/experiments/kron_direct_shapes.py [--out FILE] [--batches sd15:1,8 sdxl:1,4]
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _common import graph_us  # noqa: E402
from lyco.algorithms import factor_triton, lokr, lowrank  # noqa: E402
from lyco.algorithms.factorize import factorization  # noqa: E402
from lyco.algorithms.rebuild import cast  # noqa: E402

#: per model: (rows at batch 1, in, out, layers of that shape in the UNet, counted from the configs' block layout) —
#: each level's attention projections (SDXL's linear proj_in/out too), the cross-attention's k/v on the 77 text
#: tokens, the GEGLU projection and ff.net.2 (SD1.5: 320/640/1280 channels at 64²/32²/16² and the 8² middle block,
#: five transformer blocks a level; SDXL: 640/1280 at 64²/32², 10 and 60 blocks)
LAYERS = {
    "sd15": [(4096, 320, 320, 30), (77, 768, 320, 10), (4096, 320, 2560, 5), (4096, 1280, 320, 5),
             (1024, 640, 640, 30), (77, 768, 640, 10), (1024, 640, 5120, 5), (1024, 2560, 640, 5),
             (256, 1280, 1280, 30), (77, 768, 1280, 12), (256, 1280, 10240, 5), (256, 5120, 1280, 5),
             (64, 1280, 1280, 6), (64, 1280, 10240, 1), (64, 5120, 1280, 1)],
    "sdxl": [(4096, 640, 640, 70), (77, 2048, 640, 20), (4096, 640, 5120, 10), (4096, 2560, 640, 10),
             (1024, 1280, 1280, 372), (77, 2048, 1280, 120), (1024, 1280, 10240, 60), (1024, 5120, 1280, 60)],
}


def factors(inp, out, dev, g):
    """fp32 factors of the shapes LoKr f8 full-matrix gives the layer: W1 ``(out_l, in_m)``, W2
    ``(out_k, in_n)``."""
    in_m, in_n = factorization(inp, 8)
    out_l, out_k = factorization(out, 8)
    return (torch.randn(out_l, in_m, generator=g, device=dev) * 0.1,
            torch.randn(out_k, in_n, generator=g, device=dev) * 0.1)


def via_dw(x, gy, w1, w2, s):
    """The rebuilt op's path: ∂W′ in bf16, then both reductions in one Triton pass (fp32 sums)."""
    e = gy.t() @ x
    L, M = w1.shape
    K, C = w2.shape
    return factor_triton.kron_weight_grads(e.view(L, K, M, C), w1, w2, s, (torch.float32, torch.float32))


def kron_linear_grads_permuted(x: torch.Tensor, gy: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, s: float,
                               dts: tuple, needs=(True, True)):
    """``lokr.kron_linear_grads`` with the rows permuted first — ``Xp (in_m, R, in_n)`` and ``∂Yp (out_l, R, out_k)``
    (one copy each) — so that every product is one plain GEMM: none of the per-row ``out_l × in_m`` products of a
    batched GEMM over R, nor its batch sum. Same arguments and result.

    Order (T, G) — ``in_m·out_k ≤ out_l·in_n`` —: ``Tp = Xp·W2ᵀ`` ``(in_m, R, out_k)``; ``∂W1 = s·∂Yp·Tpᵀ`` over
    ``R·out_k``; ``Gp = W1ᵀ·∂Yp`` ``(in_m, R·out_k)``; ``∂W2 = s·Gpᵀ·Xp`` over ``in_m·R``. Order (Z, H): ``Zp = ∂Yp·W2``
    ``(out_l, R, in_n)``; ``∂W1 = s·Zp·Xpᵀ`` over ``R·in_n``; ``Hp = W1·Xp`` ``(out_l, R·in_n)``; ``∂W2 = s·∂Ypᵀ·Hp``
    over ``out_l·R``. The multiply-adds are ``lokr.kron_linear_grads``'s; the two permuted copies are activation-sized
    (x's and ∂y's).

    Why: run 330 (H200, each form alone in a CUDA graph) had the row form 1.3–12× slower than the ∂W′ path on the
    square attention projections (SDXL b1's 1280 × 1280 at 1024 rows 2.2×; SD1.5's 320 × 320 at 4096 3.8×, at 32768
    12.2×): by inference from
    its shape — not profiled — the batched GEMM of R tiny ``out_l × out_k · out_k × in_m`` products (8 × 160 · 160 × 8
    at factor 8) and the one with W1 broadcast over R. Here those contractions run over ``R·out_k`` (or ``R·in_n``)
    at once. Measured (run 334): the fastest of the three forms on no shape, and slower in the step — taken out of
    the library (session 48 review), kept here.

    Numerics: as ``lokr.kron_linear_grads`` — the intermediate rounded once to the rows' dtype, fp32 accumulation in
    the GEMMs (∂W1's and ∂W2's sums in one GEMM each, not a per-row product then a sum)."""
    r = x.shape[0]
    L, M = w1.shape
    K, N = w2.shape
    cd = gy.dtype
    xp = cast(x, cd).reshape(r, M, N).transpose(0, 1).contiguous()        # (M, R, N)
    gp = gy.reshape(r, L, K).transpose(0, 1).contiguous()                  # (L, R, K)
    w1c, w2c = cast(w1, cd), cast(w2, cd)
    g1 = g2 = None
    if M * K <= L * N:
        if needs[0]:
            t = xp.view(M * r, N) @ w2c.t()                                    # (M·R, K) = (M, R·K)
            g1 = lowrank._mm(gp.view(L, r * K), t.view(M, r * K).t(), s, dts[0])
            del t
        if needs[1]:
            g = w1c.t() @ gp.view(L, r * K)                                    # (M, R·K) = (M·R, K)
            g2 = lowrank._mm(g.view(M * r, K).t(), xp.view(M * r, N), s, dts[1])
    else:
        if needs[0]:
            z = gp.view(L * r, K) @ w2c                                        # (L·R, N) = (L, R·N)
            g1 = lowrank._mm(z.view(L, r * N), xp.view(M, r * N).t(), s, dts[0])
            del z
        if needs[1]:
            h = w1c @ xp.view(M, r * N)                                        # (L, R·N) = (L·R, N)
            g2 = lowrank._mm(gp.view(L * r, K).t(), h.view(L * r, N), s, dts[1])
    return (None if g1 is None else cast(g1, dts[0]), None if g2 is None else cast(g2, dts[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="")
    p.add_argument("--batches", nargs="*", default=["sd15:1,8", "sdxl:1,4"])
    a = p.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows_out = []
    for spec in a.batches:
        model, batches = spec.split(":")
        for b in (int(v) for v in batches.split(",")):
            for rows1, inp, out, count in LAYERS[model]:
                rows = rows1 * b
                x = torch.randn(rows, inp, generator=g, device=dev).bfloat16()
                gy = torch.randn(rows, out, generator=g, device=dev).bfloat16()
                w1, w2 = factors(inp, out, dev, g)
                ref = via_dw(x, gy, w1, w2, 0.5)
                got = lokr.kron_linear_grads(x, gy, w1, w2, 0.5, (torch.float32, torch.float32))
                err = max(float((u - v).abs().max() / v.abs().max()) for u, v in zip(got, ref))
                got = kron_linear_grads_permuted(x, gy, w1, w2, 0.5, (torch.float32, torch.float32))
                err_perm = max(float((u - v).abs().max() / v.abs().max()) for u, v in zip(got, ref))
                us_dw = graph_us(lambda: via_dw(x, gy, w1, w2, 0.5), 10)
                us_direct = graph_us(lambda: lokr.kron_linear_grads(x, gy, w1, w2, 0.5,
                                                                    (torch.float32, torch.float32)), 10)
                us_perm = graph_us(lambda: kron_linear_grads_permuted(x, gy, w1, w2, 0.5,
                                                                      (torch.float32, torch.float32)), 10)
                rec = dict(model=model, batch=b, rows=rows, inp=inp, out=out, layers=count,
                           rows_per_width=round(rows * (out + inp) / (out * inp), 3), err=round(err, 5),
                           err_perm=round(err_perm, 5), us_dw=round(us_dw, 2), us_direct=round(us_direct, 2),
                           us_perm=round(us_perm, 2), ratio=round(us_direct / us_dw, 3),
                           ratio_perm=round(us_perm / us_dw, 3))
                print(json.dumps(rec), flush=True)
                rows_out.append(rec)
            tot = [r for r in rows_out if r["model"] == model and r["batch"] == b]
            print(json.dumps(dict(model=model, batch=b, summed_ms_dw=round(sum(r["us_dw"] * r["layers"] for r in tot)
                                                                          / 1e3, 3),
                                  summed_ms_direct=round(sum(r["us_direct"] * r["layers"] for r in tot) / 1e3, 3),
                                  summed_ms_perm=round(sum(r["us_perm"] * r["layers"] for r in tot) / 1e3, 3),
                                  summed_ms_best=round(sum(min(r["us_dw"], r["us_direct"]) * r["layers"]
                                                           for r in tot) / 1e3, 3),
                                  summed_ms_best3=round(sum(min(r["us_dw"], r["us_direct"], r["us_perm"])
                                                            * r["layers"] for r in tot) / 1e3, 3))), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows_out, f, indent=1)


if __name__ == "__main__":
    main()

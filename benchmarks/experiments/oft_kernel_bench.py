"""Diag-OFT's per-layer kernels (``oft_triton``) at the ``lin`` layers of SD1.5 b8 and SDXL b4 (1024 px), bf16, block
size 16 as ``train_step.py``'s Diag-OFT (rank 16), each layer's work captured 20× in one CUDA graph and replayed:

* **gram** — the output-keeping op's block Gram ``Σ_t ∂y_kᵀ·(y_k − b_k)`` (``oft_triton.block_gram``, the layers
  ``oft._keep_output`` takes: ≥ 512 inputs) under several tile settings, its error against float64, and the rebuilt
  op's route it replaces: the weight-gradient GEMM ``∂yᵀ·x`` and the batched ``E_k·W_kᵀ``;
* **rotate** — the rows' rotation ``W + A′·W`` (``oft_triton.rotate_rows``) under several column tiles and warps,
  against torch's build (A′'s two kernels and ``baddbmm``), once forward and once backward per layer;
* **cayley** — the Cayley backward from the Gram's partials (``oft_triton.cayley_grad``) against its torch form.

µs per layer and the sums over the layers with their multiplicities (ms per step).

    python benchmarks/experiments/oft_kernel_bench.py OUT_DIR [--quick]

``--quick``: the module's own settings only. ``--smoke``: the tiny U-Net on the CPU, the kernels in Triton's
interpreter, nothing timed (the script's own check, no GPU; every layer whose output is a multiple of 16).
"""
import collections
import json
import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402

sys.path.insert(0, "src")
sys.path.insert(0, "benchmarks")
from _common import graph_us, lin_layer_shapes  # noqa: E402
from lyco.algorithms import oft, oft_triton  # noqa: E402
from lyco.algorithms.factorize import factorization  # noqa: E402

SIZES = {"sd15_b8": ("sd15", 8), "sdxl_b4": ("sdxl", 4)}
GRAM = [dict(BM=bm, BC=bc, num_warps=w, programs=p) for bm in (64, 128, 256) for bc in (16, 32, 64) for w in (4, 8)
        for p in (264, 528, 1056)]
ROTATE = [dict(BK=bk, num_warps=w) for bk in (64, 128, 256) for w in (4, 8)]
DEV = torch.device("cpu" if SMOKE else "cuda")


def _rel(got, ref) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def _torch_build(w, minv):
    """The torch build :class:`lyco.algorithms.oft._DiagOFTBuild` runs without the kernels, at multiplier 1 (A′'s two
    kernels and ``baddbmm``, which copies W into its output first)."""
    build = oft._DiagOFTBuild(1.0, None)
    return build._build(w, build._a_w(minv, w.dtype))


def main():
    global GRAM, ROTATE, graph_us
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="example: python "
                                 "benchmarks/experiments/oft_kernel_bench.py /tmp/oftk --quick")
    ap.add_argument("out_dir", help="where oft_kernel_bench.json goes (must exist)")
    for flag in ("--quick", "--smoke"):
        ap.add_argument(flag, action="store_true")
    a = ap.parse_args()
    if a.quick or SMOKE:
        GRAM, ROTATE = [dict(oft_triton._CFG)], [dict(oft_triton._ROWS_CFG)]
    dt = torch.bfloat16
    if SMOKE:
        graph_us = lambda fn, reps: (fn(), 0.0)[1]  # noqa: E731
    else:
        assert oft_triton.usable(torch.empty(1, device=DEV, dtype=dt), 16), "the kernels' self-test failed here"
    res = {"device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(0), "torch": torch.__version__,
           "gram_cfgs": GRAM, "rotate_cfgs": ROTATE, "sizes": {}}
    g0, r0 = dict(oft_triton._CFG), dict(oft_triton._ROWS_CFG)
    for size, (model, batch) in SIZES.items():
        rows_out, tot = [], collections.Counter()
        for n, k_in, k_out, wshape, count in lin_layer_shapes(model, batch, DEV, SMOKE):
            b = 16 if SMOKE else factorization(k_out, 16)[0]
            if k_out % b or not oft_triton.supports(b) or (k_in < 512 and not SMOKE):
                continue
            nb = k_out // b
            g = torch.Generator(device=DEV).manual_seed(n + k_in + k_out)
            row = {"rows": n, "in": k_in, "out": k_out, "block": b, "layers": count}
            gy = torch.randn(n, k_out, device=DEV, dtype=dt, generator=g)
            y = torch.randn(n, k_out, device=DEV, dtype=dt, generator=g)
            bias = torch.randn(k_out, device=DEV, dtype=dt, generator=g)
            ref = oft_triton.block_gram_torch(gy.double(), y.double(), bias.double(), b)
            for i, c in enumerate(GRAM):
                if c["BC"] < b:
                    continue
                oft_triton._CFG.update(c)
                row[f"gram{i}_err"] = _rel(oft_triton.block_gram(gy, y, bias, b), ref)
                row[f"gram{i}_us"] = graph_us(lambda: oft_triton.block_gram(gy, y, bias, b, parts=True), 20)
                tot[f"gram{i}"] += count * row[f"gram{i}_us"]
            oft_triton._CFG.update(g0)
            x = torch.randn(n, k_in, device=DEV, dtype=dt, generator=g)
            w = torch.randn(wshape, device=DEV, dtype=dt, generator=g)
            wb = w.reshape(nb, b, -1)
            row["wgrad_us"] = graph_us(lambda: torch.bmm((gy.t() @ x).view(nb, b, -1), wb.transpose(1, 2)), 20)
            tot["wgrad"] += count * row["wgrad_us"]
            q = 0.05 * torch.randn(nb, b, b, device=DEV, generator=g)
            minv = torch.linalg.inv_ex(torch.eye(b, device=DEV) - (q - q.transpose(1, 2)))[0]
            ref_w = _torch_build(w, minv)
            row["rotate_torch_us"] = graph_us(lambda: _torch_build(w, minv), 20)
            tot["rotate_torch"] += 2 * count * row["rotate_torch_us"]
            for i, c in enumerate(ROTATE):
                oft_triton._ROWS_CFG.update(c)
                row[f"rotate{i}_err"] = _rel(oft_triton.rotate_rows(w, minv, 2.0), ref_w)
                row[f"rotate{i}_us"] = graph_us(lambda: oft_triton.rotate_rows(w, minv, 2.0), 20)
                tot[f"rotate{i}"] += 2 * count * row[f"rotate{i}_us"]
            oft_triton._ROWS_CFG.update(r0)
            part = oft_triton.block_gram(gy, y, bias, b, parts=True)
            ref_c = oft_triton.cayley_grad_torch(part.double(), minv.double(), 2.0, torch.float64, True)
            row["cayley_err"] = _rel(oft_triton.cayley_grad(part, minv, 2.0, torch.float32, True), ref_c)
            row["cayley_us"] = graph_us(lambda: oft_triton.cayley_grad(part, minv, 2.0, torch.float32, True), 20)
            row["cayley_torch_us"] = graph_us(
                lambda: oft_triton.cayley_grad_torch(part, minv, 2.0, torch.float32, True), 20)
            tot["cayley"] += count * row["cayley_us"]
            tot["cayley_torch"] += count * row["cayley_torch_us"]
            rows_out.append(row)
            print(size, json.dumps(row), flush=True)
            del gy, y, x, w
        res["sizes"][size] = {"layers": rows_out, "totals_us": dict(tot)}
        print(f"== {size} totals (ms per step):")
        for k in sorted(tot, key=lambda k: (k.rstrip("0123456789"), tot[k])):
            print(f"   {k:20s} {tot[k] / 1e3:8.3f}")
    with open(f"{a.out_dir}/oft_kernel_bench.json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

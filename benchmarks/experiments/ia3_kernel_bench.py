"""(IA)³'s per-layer kernels at the ``lin`` layers of SD1.5 b8 and SDXL b4 (1024 px), bf16, each layer's work captured
20× in one CUDA graph and replayed:

* **build** — ``W′ = W + W ⊙ (s·w)`` rows, what the rebuilt op and ``_KeepOutput`` run once forward and once backward
  per layer: torch's ``addcmul`` (``scale_triton.scale_rows_torch``) against ``scale_triton.scale_rows`` under several
  block sizes and warps, with the count of elements where the two differ;
* **channel** — ``∂w`` from ∂y and y (``scale_triton.channel_grad``, ``_KeepOutput``'s backward) under several tile
  settings, and for the layers under ``_keep_output``'s input line the rebuilt op's route for comparison: the
  weight-gradient GEMM ``∂yᵀ·x`` and the row dot with W.

* **geglu** — at each GEGLU projection (``ff.net.0.proj``, output ``[a | g]``): the GEGLU's backward without ∂D and
  the projection's channel gradient read from ∂p and p (two launches), against the same kernel forming the channel
  sums beside its tiles (``chan``, change 121) and ``channel_finish``.

µs per layer and the sums over the layers with their multiplicities (one build forward + one backward per layer).

    python benchmarks/experiments/ia3_kernel_bench.py OUT_DIR [--quick]

``--quick``: the modules' own settings only; ``--channel-only``: the channel gradient only; ``--geglu-only``: the
GEGLU section only. ``--smoke``: the tiny U-Net on the CPU, the kernels in Triton's
interpreter, nothing timed (the script's own check, no GPU).
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
from lyco.algorithms import scale_triton  # noqa: E402
from lyco.algorithms.rebuild import rowdot  # noqa: E402

SIZES = {"sd15_b8": ("sd15", 8), "sdxl_b4": ("sdxl", 4)}
BUILD = [dict(BLOCK=b, num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8)]
# run 206 swept (64, 64), (32, 128), (64, 128), (128, 64) × 4 or 8 warps × 264, 512, 1056 programs (best: 128 × 64, 8
# warps, 264); run 207 sweeps around it
CHANNEL = [dict(BM=bm, BC=bc, num_warps=w, programs=p) for bm in (128, 256) for bc in (32, 64, 128) for w in (8, 16)
           for p in (132, 264, 528)]


def layer_shapes(model: str, batch: int):
    """[(rows, in, out, weight shape, count)] of the ``lin`` set (:func:`_common.lin_layer_shapes`)."""
    return lin_layer_shapes(model, batch, DEV, SMOKE)


DEV = torch.device("cpu" if SMOKE else "cuda")


def geglu(layers, tot, rows_out, size):
    """The GEGLU section (module doc): the layers whose output is 8× their input (diffusers' GEGLU projections)."""
    from lyco.algorithms import regen_triton
    dt, s = torch.bfloat16, 1.0
    for n, k_in, k_out, wshape, count in layers:
        if k_out != 8 * k_in:
            continue
        k = k_out // 2
        g = torch.Generator(device=DEV).manual_seed(n + k)
        p = torch.randn(n, 2 * k, device=DEV, dtype=dt, generator=g) * 2
        gx = torch.randn(n, k, device=DEV, dtype=dt, generator=g)
        b = torch.randn(2 * k, device=DEV, dtype=dt, generator=g)
        wf = torch.randn(2 * k, device=DEV, generator=g) * 0.1
        link = scale_triton.ChannelLink(b)

        def apart():
            gp, _ = regen_triton.geglu_backward(gx, p, None)
            return scale_triton.channel_grad(gp, p, b, wf, s)

        def fused():
            gp, _ = regen_triton.geglu_backward(gx, p, None, chan=link)
            return scale_triton.channel_finish(link.take(gp), wf, s)

        ref, got = apart(), fused()
        row = {"geglu_rows": n, "inner": k, "layers": count,
               "geglu_err": float((got.double() - ref.double()).abs().max() / ref.double().abs().max()),
               "geglu_apart_us": graph_us(apart, 20), "geglu_fused_us": graph_us(fused, 20)}
        tot["geglu_apart"] += count * row["geglu_apart_us"]
        tot["geglu_fused"] += count * row["geglu_fused_us"]
        rows_out.append(row)
        print(size, json.dumps(row), flush=True)


def main():
    global BUILD, CHANNEL, graph_us
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="example: python "
                                 "benchmarks/experiments/ia3_kernel_bench.py /tmp/ia3k --quick")
    ap.add_argument("out_dir", help="where ia3_kernel_bench.json goes (must exist)")
    for flag in ("--quick", "--channel-only", "--geglu-only", "--smoke"):
        ap.add_argument(flag, action="store_true")
    a = ap.parse_args()
    out_dir = a.out_dir
    if a.quick or SMOKE:
        BUILD, CHANNEL = [dict(scale_triton._BUILD_CFG)], [dict(scale_triton._CG_CFG)]
    if a.channel_only:
        BUILD = []
    geglu_only = a.geglu_only
    dev, dt, s = DEV, torch.bfloat16, 1.0
    if SMOKE:
        graph_us = lambda fn, reps: (fn(), 0.0)[1]  # noqa: E731
    else:
        assert scale_triton.usable(torch.empty(1, device=dev, dtype=dt)), "the kernels' self-test failed here"
    res = {"device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(0), "torch": torch.__version__, "build_cfgs": BUILD,
           "channel_cfgs": CHANNEL, "sizes": {}}
    b0, c0 = dict(scale_triton._BUILD_CFG), dict(scale_triton._CG_CFG)
    for size, (model, batch) in SIZES.items():
        layers = layer_shapes(model, batch)
        rows_out, tot = [], collections.Counter()
        geglu(layers, tot, rows_out, size)
        for n, k_in, k_out, wshape, count in ([] if geglu_only else layers):
            g = torch.Generator(device=dev).manual_seed(n + k_in + k_out)
            w = torch.randn(wshape, device=dev, dtype=dt, generator=g)
            wv = (torch.randn(k_out, device=dev, generator=g) * 0.1).to(dt)
            row = {"rows": n, "in": k_in, "out": k_out, "weight": list(wshape), "layers": count}
            ref = scale_triton.scale_rows_torch(w, wv, s)
            if BUILD:
                row["build_torch_us"] = graph_us(lambda: scale_triton.scale_rows_torch(w, wv, s), 20)
                tot["build_torch"] += 2 * count * row["build_torch_us"]
            for i, c in enumerate(BUILD):
                scale_triton._BUILD_CFG.update(c)
                got = scale_triton.scale_rows(w, wv, s)
                row[f"build{i}_differ"] = int((got != ref).sum())
                row[f"build{i}_us"] = graph_us(lambda: scale_triton.scale_rows(w, wv, s), 20)
                tot[f"build{i}"] += 2 * count * row[f"build{i}_us"]
            scale_triton._BUILD_CFG.update(b0)
            gy = torch.randn(n, k_out, device=dev, dtype=dt, generator=g)
            y = torch.randn(n, k_out, device=dev, dtype=dt, generator=g)
            b = torch.randn(k_out, device=dev, dtype=dt, generator=g)
            wf = torch.randn(k_out, device=dev, generator=g) * 0.1
            ref_c = scale_triton.channel_grad_torch(gy.double(), y.double(), b.double(), wf.double(), s)
            for i, c in enumerate(CHANNEL):
                scale_triton._CG_CFG.update(c)
                got = scale_triton.channel_grad(gy, y, b, wf, s)
                row[f"channel{i}_err"] = float((got.double() - ref_c).abs().max() / ref_c.abs().max())
                row[f"channel{i}_us"] = graph_us(lambda: scale_triton.channel_grad(gy, y, b, wf, s), 20)
                tot[f"channel{i}"] += count * row[f"channel{i}_us"]
                tot[f"channel{i}_in512"] += count * row[f"channel{i}_us"] * (k_in >= 512)
            scale_triton._CG_CFG.update(c0)
            if k_in < 512:
                x = torch.randn(n, k_in, device=dev, dtype=dt, generator=g)
                w2 = w.reshape(k_out, -1)
                row["wgrad_us"] = graph_us(lambda: rowdot(gy.t() @ x, w2), 20)
                tot["wgrad_below512"] += count * row["wgrad_us"]
                tot["channel_default_below512"] += count * graph_us(
                    lambda: scale_triton.channel_grad(gy, y, b, wf, s), 20)
            rows_out.append(row)
            print(size, json.dumps(row), flush=True)
            del w, wv, gy, y, b
        res["sizes"][size] = {"layers": rows_out, "totals_us": dict(tot)}
        print(f"== {size} totals (ms per step):")
        for k in sorted(tot, key=lambda k: (k.split("_")[0].rstrip("0123456789"), tot[k])):
            print(f"   {k:28s} {tot[k] / 1e3:8.3f}")
    with open(f"{out_dir}/ia3_kernel_bench.json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

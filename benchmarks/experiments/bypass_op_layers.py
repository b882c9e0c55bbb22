#!/usr/bin/env python3
"""Per layer: the low-rank bypass op against the delta path, forward + backward as CUDA graphs (issue 7, run 66).

Run 65 (``benchmarks/run_bypass_op.sh``) found the op (``lyco/algorithms/lowrank.py``: exact forward, ∂x through
the merged weight ``W + s·U·D``, a conv's ∂D by an im2col of ∂h) a gain on SD1.5 b8's linear layers and none on
its convs as a whole step — within the step's ±1 ms noise. Which layers gain and which lose follows from the
shapes (the merged weight costs two weight-sized passes, the delta path's ∂x about four input-sized ones), so
this times every one of SD1.5's 242 ``lin+conv`` layers alone with LoCon's adapters (rank 16 on linears, 8 on
3×3 convs), one layer's forward and backward (∂x and the adapter's gradients) captured ``--reps`` times in one
CUDA graph, three ways: ``delta`` (``LYCO_BYPASS_OP=0``), ``op`` (``=1``), and for convs ``op-cudnn-wgrad`` (the op
with ∂D by cuDNN's weight gradient instead of the im2col). Writes one JSON row per layer with its shapes.

    python benchmarks/experiments/bypass_op_layers.py [--out DIR] [--smoke] [--algo lokr]
    python benchmarks/experiments/bypass_op_layers.py --profile --only down_blocks.0.resnets.0.conv1
    python benchmarks/experiments/bypass_op_layers.py --algo lokr --set conv --rebuild   # runs 83-84

``--rebuild`` adds a fourth way, the rebuilt op (the adapter's mode set to "rebuild"), per layer. ``--algo lokr-full``
(LoKr with full W2): ``delta`` is then the rebuilt op too (``mode = "auto"`` rebuilds it where the op is off), ``op``
the full W2's LoRA form on every k×k conv (``LoKr.prefers_op_over_rebuild`` forced; run 148).
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from _common import graph_us  # noqa: E402
from train_step import attach_lyco, build_unet, layer_input_shapes, layer_sets  # noqa: E402

from lyco.algorithms import lowrank  # noqa: E402


def kernel_table(fn, cuda: bool, calls: int = 5) -> list[str]:
    """The kernels (or, on the CPU, the ops) of one ``fn()`` call by self device time, averaged over ``calls``."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                 record_shapes=True) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        on_dev = str(getattr(e, "device_type", "")).endswith("CUDA")
        if cuda != on_dev:
            continue
        t = float(getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total)
        rows.append((t / calls, e.count / calls, e.key[:110]))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    copies = []  # where the copies come from: the op that called each copy_, with the shapes
    for e in prof.events():
        if e.name == "aten::copy_":
            chain, p = [], e.cpu_parent
            while p is not None and len(chain) < 3:
                chain.append(p.name)
                p = p.cpu_parent
            copies.append(f"    copy_ {e.input_shapes[:2]} <- {' <- '.join(chain)}")
    return ([f"  {t:8.1f} us {c:4.0f}x  {k}" for t, c, k in rows if t > 0] + [f"  {total:8.1f} us total"]
            + sorted(set(copies)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="CPU, the tiny UNet: the paths run, no timing")
    p.add_argument("--algo", default="locon", choices=["locon", "loha", "lokr", "lokr-full"],
                   help="the adapters on every lin+conv layer (train_step.py's configurations of these names)")
    p.add_argument("--only", default="", help="comma list of layer names (default: every lin+conv layer)")
    p.add_argument("--set", default="lin+conv", choices=["lin", "conv", "lin+conv", "allconv"],
                   help="the layers timed when --only is not given")
    p.add_argument("--rebuild", action="store_true",
                   help="also time the rebuilt op (the adapter's mode set to 'rebuild': one merged weight, its "
                        "weight gradient by the frozen layer's own wgrad GEMM/conv)")
    p.add_argument("--epilogue", action="store_true",
                   help="convs also as op-epi (LYCO_CONV_EPILOGUE=1: the bias and the up in one Triton pass) and "
                        "op-nhwc (and LYCO_CONV_NHWC=1: a k×k conv's input channels-last once), op-nhwc-torch "
                        "(the same by torch's strided copy); the plain op with both 0")
    p.add_argument("--profile", action="store_true",
                   help="per layer and way, the kernels of one forward + backward (torch.profiler, eager calls; "
                        "device time per kernel) into kernels.txt")
    a = p.parse_args()
    dev, dt = torch.device("cpu" if a.smoke else "cuda"), torch.bfloat16
    unet = build_unet("sd15", a.smoke, dev, dt)
    names = layer_sets(unet)
    handle = attach_lyco(unet, a.algo, names, "auto", dt)
    mods = dict(unet.named_modules())
    targets = ([n for n in names["lin+conv"] if isinstance(mods[n], torch.nn.Conv2d)] if a.set == "allconv"
               else names[a.set])
    if a.only:
        targets = [t for t in a.only.split(",") if t]
        missing = [t for t in targets if t not in mods]
        if missing:
            raise SystemExit(f"--only: no such layer in the SD1.5 UNet: {missing}")
    shapes = layer_input_shapes(unet, targets, 2 if a.smoke else 8, 8 if a.smoke else 64, dev, dt)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():  # a trained-looking up (LoRA starts it at zero)
        for prm in handle.params:
            prm.add_((0.02 * torch.randn(prm.shape, generator=gen)).to(prm.device, prm.dtype))
    if a.algo == "lokr-full":  # the op ways take a full W2's LoRA form on every k×k conv (the rule forced)
        from lyco.algorithms.lokr import LoKr
        LoKr.EYE_POSITIONS = 1e9
    rows, prof_lines = [], []
    t0 = time.time()
    real_im2col, real_cat, real_nhwc = lowrank._im2col_ok, lowrank._cat_pays, lowrank._nhwc_copy
    lowrank.bypass_pays = lambda spec, x, grouped=False: True
    for name in targets:
        m = mods[name]
        (ad,) = m._lyco_host.adapters
        params = [v for v in ad.tensors().values() if v.requires_grad]
        x = torch.randn(*shapes[name], generator=gen).to(dev, dt).requires_grad_()
        with torch.no_grad():
            gy = torch.randn_like(m(x))

        def fn():
            return torch.autograd.grad(m(x), [x] + params, gy)
        conv = isinstance(m, torch.nn.Conv2d)
        row = {"name": name, "kind": "conv2d" if conv else "linear", "x": list(shapes[name]),
               "in": m.weight.shape[1], "out": m.weight.shape[0], "k": list(m.weight.shape[2:]),
               "positions": x.numel() // x.shape[1 if conv else -1]}
        # the op on every layer it supports (the shape rule lowrank.bypass_pays forced), with and without the
        # concatenated GEMMs of wide linear layers (lowrank._cat_pays), and a conv's ∂D by cuDNN
        ways = [("delta", "0", real_im2col, real_cat), ("op", "1", real_im2col, real_cat)]
        if not conv and m.weight.shape[0] >= 2 * m.weight.shape[1]:
            ways.append(("op-nocat", "1", real_im2col, lambda spec, r: False))
        if conv:
            ways.append(("op-cudnn-wgrad", "1", lambda spec, r: False, real_cat))
            if a.epilogue:
                ways += [("op-epi", "1", real_im2col, real_cat), ("op-nhwc", "1", real_im2col, real_cat),
                         ("op-nhwc-torch", "1", real_im2col, real_cat)]
        if a.rebuild:
            ways.append(("rebuild", "0", real_im2col, real_cat))
        outs = {}
        for way, flag, im2col, cat in ways:
            os.environ["LYCO_BYPASS_OP"] = flag
            os.environ["LYCO_CONV_EPILOGUE"] = "1" if way.startswith(("op-epi", "op-nhwc")) else "0"
            os.environ["LYCO_CONV_NHWC"] = "1" if way.startswith("op-nhwc") else "0"
            # op-nhwc-torch: the input converted by torch's strided copy instead of lowrank_triton.channels_last
            lowrank._nhwc_copy = (lambda t: t.contiguous(memory_format=torch.channels_last)) \
                if way == "op-nhwc-torch" else real_nhwc
            lowrank._im2col_ok, lowrank._cat_pays = im2col, cat
            ad.mode = "rebuild" if way == "rebuild" else "auto"
            outs[way] = [t.float() for t in fn()]
            if way == "op":  # whether this layer's adapter takes the op at all (else both ways are the delta path)
                with torch.enable_grad():
                    node = m(x).grad_fn
                if node is not None and type(node).__name__ in ("ViewBackward0", "UnsafeViewBackward0"):
                    node = node.next_functions[0][0]  # the host's view of a linear layer's 2-D rows
                row["op_taken"] = node is not None and "_BypassOp" in type(node).__name__
            if not a.smoke:
                row[way] = graph_us(fn, a.reps)
            if a.profile:
                prof_lines.append(f"== {name} {row['x']} {way}" + (f": {row[way]:.1f} us in a graph" if way in row
                                                                      else ""))
                prof_lines.extend(kernel_table(fn, dev.type == "cuda"))
        lowrank._im2col_ok, lowrank._cat_pays = real_im2col, real_cat
        ad.mode = "auto"
        # the ways agree (bf16: ∂x of the op carries the merge's rounding)
        row["max_rel_diff"] = max(((o - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                                  for w in outs if w != "delta" for o, r in zip(outs[w], outs["delta"]))
        rows.append(row)
        if len(rows) % 20 == 0:
            print(f"{len(rows)}/{len(targets)} layers, {time.time() - t0:.0f} s", flush=True)
    for var in ("LYCO_BYPASS_OP", "LYCO_CONV_EPILOGUE", "LYCO_CONV_NHWC"):
        os.environ.pop(var, None)
    res = {"device": "cpu (smoke)" if a.smoke else torch.cuda.get_device_name(), "algo": a.algo, "rows": rows}
    if not a.smoke:
        for kind in ("linear", "conv2d"):
            sel = [r for r in rows if r["kind"] == kind]
            tot = {w: sum(r.get(w, r["op"]) for r in sel) / 1000.0
                   for w in ("delta", "op", "op-nocat", "op-cudnn-wgrad", "op-epi", "op-nhwc", "op-nhwc-torch",
                             "rebuild")
                   if any(w in r for r in sel)}
            best = sum(min(r.get(w, r["op"]) for w in tot) for r in sel) / 1000.0
            print(f"{kind}: {len(sel)} layers, ms per step " + ", ".join(f"{w} {v:.2f}" for w, v in tot.items())
                  + f", best per layer {best:.2f}", flush=True)
    print(f"the op taken on {sum(r.get('op_taken', False) for r in rows)} of {len(rows)} layers", flush=True)
    print(f"worst relative difference of the op's outputs to the delta path's: "
          f"{max(r['max_rel_diff'] for r in rows):.2e}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    if a.profile:
        with open(os.path.join(a.out, "kernels.txt"), "w") as f:
            f.write("\n".join(prof_lines) + "\n")
        print("\n".join(prof_lines), flush=True)
    with open(os.path.join(a.out, "bypass_op_layers.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

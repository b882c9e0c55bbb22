"""The conv downs' weight gradients of one training step (``lyco/algorithms/wgrad_triton.py``) alone: every ∂D the
step asks :func:`lyco.algorithms.lowrank._triton_wgrad` for (LoCon's and LoHa's downs, LoKr's grouped W2 on the op and
on the delta path), recorded from one forward and backward of the benchmark's model at the given batch, then replayed
as one CUDA graph each way — the torch path (``_conv_wgrad_nchw``'s shifted copies where their rule holds, cuDNN's
weight gradient elsewhere) against the Triton kernel at each launch geometry. Every call is checked against an fp32
reference first. Device time per step, not the step's time: what the step exposes is for ``train_step.py``.

    python benchmarks/wgrad_kernel_bench.py [--algos locon,lokr] [--batch 1] [--out DIR]
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from _common import graph_us  # noqa: E402
import train_step as T  # noqa: E402

from lyco.algorithms import graph_policy, lowrank, wgrad_triton as W  # noqa: E402
from lyco.algorithms.rebuild import op_backward  # noqa: E402

CONFIGS = {
    "default": dict(W._CFG),
    "bn64-bk128": dict(W._CFG, BN=64, BK=128),
    "bn32-bk64": dict(W._CFG, BN=32, BK=64, min_k_tiles=4),
    "bn32-bk128-s32": dict(W._CFG, max_splits=32),
    "bn32-bk128-s8": dict(W._CFG, max_splits=8),
}
PER_CALL = ("default", "bn64-bk128")

def record(algo: str, batch: int, model: str):
    """(x, ∂h, spec, dtype) of every ∂D the step asks for, cloned."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    unet = T.build_unet(model, False, dev, dt)
    names = T.layer_sets(unet)
    handle = T.attach_lyco(unet, algo, names, T.VARIANTS["lyco"]["mode"], dt)
    T.randomise_(handle.params, 0, 0.05)
    calls = []
    orig = lowrank._triton_wgrad

    def spy(x, gh, spec, dtype=None):
        calls.append((x.detach().clone(memory_format=torch.preserve_format),
                      gh.detach().clone(memory_format=torch.preserve_format), spec, dtype))
        return orig(x, gh, spec, dtype)

    inp, target = T.make_inputs(unet, batch, T.MODELS[model]["latent"], dev, dt)
    lowrank._triton_wgrad = spy
    os.environ["LYCO_WGRAD_KERNEL"] = "1"
    try:
        with graph_policy.graph_step():
            out = unet(**inp).sample
            torch.nn.functional.mse_loss(out.float(), target.float()).backward()
    finally:
        lowrank._triton_wgrad = orig
        os.environ["LYCO_WGRAD_KERNEL"] = "0"
    torch.cuda.synchronize()
    handle.detach()
    del unet
    return calls




def old_path(x, gh, spec, dtype):
    if lowrank._im2col_ok(spec, gh.shape[1]) and x.is_contiguous():
        return lowrank._conv_wgrad_nchw(x, gh, spec, dtype)
    w = torch.empty((gh.shape[1], x.shape[1], *spec.kernel), dtype=x.dtype, device=x.device)
    g = op_backward(spec, x, w, gh, False, True, False)[1]
    return g if dtype is None else g.to(dtype)


def kernel_path(x, gh, spec, dtype, cfg, form=None):
    """The kernel in ``form`` (where None: the rule's, else taps for stride 1 and cols for stride 2)."""
    form = form or W.form(x.shape, gh.shape[1], spec.kernel, spec.stride, spec.padding, spec.dilation, x.device)
    return W.conv_wgrad(x, gh, spec.kernel, spec.stride, spec.pads, spec.dilation, dtype, cfg=cfg, form=form)


def rule_path(x, gh, spec, dtype):
    """What the step runs: the kernel where :func:`wgrad_triton.form` takes the shape, the torch path elsewhere."""
    if W.form(x.shape, gh.shape[1], spec.kernel, spec.stride, spec.padding, spec.dilation, x.device) is None:
        return old_path(x, gh, spec, dtype)
    return kernel_path(x, gh, spec, dtype, None)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", default="locon,lokr")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--model", default="sd15", choices=sorted(T.MODELS))
    p.add_argument("--out", default=".")
    a = p.parse_args()
    T.quiet_libraries()
    res = {"device": torch.cuda.get_device_name(), "model": a.model, "batch": a.batch, "algos": {}}
    for algo in a.algos.split(","):
        calls = record(algo, a.batch, a.model)
        shapes = {}
        for x, gh, spec, _ in calls:
            key = f"x{tuple(x.shape)} r{gh.shape[1]} k{spec.kernel} s{spec.stride}"
            shapes[key] = shapes.get(key, 0) + 1
        print(f"{algo}: {len(calls)} weight gradients", flush=True)
        for k, v in shapes.items():
            print(f"   {v:3d}× {k}", flush=True)
        rec = {"calls": len(calls), "shapes": shapes, "torch_us": None, "configs": {}}

        def run_old():
            for x, gh, spec, dtype in calls:
                old_path(x, gh, spec, dtype)
        rec["torch_us"] = graph_us(run_old, 1, replays=15)
        print(f"   torch path {rec['torch_us']:8.1f} us", flush=True)

        def run_rule():
            for x, gh, spec, dtype in calls:
                rule_path(x, gh, spec, dtype)
        rec["rule_us"] = graph_us(run_rule, 1, replays=15)
        taken = sum(W.form(x.shape, gh.shape[1], sp.kernel, sp.stride, sp.padding, sp.dilation, x.device) is not None
                    for x, gh, sp, _ in calls)
        print(f"   the rule   {rec['rule_us']:8.1f} us  ({rec['rule_us'] / rec['torch_us']:.3f}x)  "
              f"kernel on {taken} of {len(calls)}", flush=True)
        for cname, cfg in CONFIGS.items():
            worst = 0.0
            for x, gh, spec, dtype in calls:
                got = kernel_path(x, gh, spec, dtype, cfg).float()
                ref = W.conv_wgrad_torch(x.float(), gh.float(), spec.kernel, spec.stride, spec.pads, spec.dilation,
                                         torch.float32)
                worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())

            def run_new(cfg=cfg):
                for x, gh, spec, dtype in calls:
                    kernel_path(x, gh, spec, dtype, cfg)
            us = graph_us(run_new, 1, replays=15)
            rec["configs"][cname] = dict(cfg=cfg, us=us, max_rel_err=worst)
            print(f"   {cname:18s} {us:8.1f} us  ({us / rec['torch_us']:.3f}x)  err {worst:.1e}", flush=True)
        # per distinct shape: the torch path against the kernel's forms
        per, seen = [], set()
        for x, gh, spec, dtype in calls:
            key = f"x{tuple(x.shape)} r{gh.shape[1]} k{spec.kernel} s{spec.stride}"
            if key in seen:
                continue
            seen.add(key)
            fm = W.form(x.shape, gh.shape[1], spec.kernel, spec.stride, spec.padding, spec.dilation, x.device)
            row = [key, shapes[key], graph_us(lambda: old_path(x, gh, spec, dtype), 5, replays=5)]
            row += [graph_us(lambda c=CONFIGS[n]: kernel_path(x, gh, spec, dtype, c), 5, replays=5) for n in PER_CALL]
            per.append(row)
            print(f"   {key:44s} {row[1]:3d}x {str(fm):5s} torch {row[2]:6.1f} " + " ".join(
                f"{n} {t:6.1f}" for n, t in zip(PER_CALL, row[3:])), flush=True)
        rec["per_call"] = per
        res["algos"][algo] = rec
        del calls
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "wgrad_kernel_bench.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The shared-input op (``algorithms/lowrank_shared.py``: a self-attention's q/k/v, a cross-attention's k/v as one
op) on the GPU against float64 math, beside each layer's own bypass op on the same inputs — issue 7, NOTES change 89.

The CPU tests compare it with float64 on the CPU; here the CUDA-only parts run: ``out_dtype`` GEMMs (∂x of an fp32
input added up by the GEMMs, the factor gradients in fp32, the gradient sink), GEMMs writing into column views
(∂h side by side), the side stream and the Triton merge (inside ``graph_policy.graph_step``). Cases:
``bf16`` (bf16 model and adapter, as ``train_step.py``) and ``mixed`` (``lyco train``: bf16 model under autocast, an
fp32 norm output as input, fp32 adapter in FlatAdamW's flat buffer, ``step_casts(grad_sink=True)``, two micro-batches
against twice the reference). Run 127 had a second forward form (``[x | s·h]``, taken out).

    python benchmarks/experiments/shared_input_check.py     # exit 1 if any relative error exceeds --tol
"""

import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ["LYCO_BYPASS_OP"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
import lyco  # noqa: E402
from lyco.algorithms import casts, graph_policy  # noqa: E402
from lyco.optim import FlatAdamW  # noqa: E402


class Attn(nn.Module):
    def __init__(self, d, dctx, cross):
        super().__init__()
        self.to_q = nn.Linear(d, d)
        self.to_k, self.to_v = nn.Linear(dctx, d), nn.Linear(dctx, d)
        self.is_cross_attention = cross

    def forward(self, x, ctx):
        kv = x if ctx is None else ctx
        return self.to_q(x), self.to_k(kv), self.to_v(kv)


def run(case: str, cross: bool, shared: str, dev: str):
    os.environ["LYCO_SHARED_INPUT"] = shared
    torch.manual_seed(0)
    d, n, dctx, nctx = 320, 8192, 768, 616
    att = Attn(d, dctx if cross else d, cross)
    model = nn.Sequential(att).to(dev)
    net = lyco.create(model, preset="full", algo="lora", rank=16, alpha=8.0, seed=1)
    mixed = case == "mixed"
    model.to(torch.bfloat16)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.data = (p.data.float() + 0.05 * torch.randn(p.shape, device=dev)).to(
                torch.float32 if mixed else torch.bfloat16)
    params = list(net.trainable_parameters())
    if mixed:
        FlatAdamW(params, lr=1e-3)
        for p in params:
            p.grad = torch.zeros_like(p)
    xdt = torch.float32 if mixed else torch.bfloat16
    x = torch.randn(n, d, device=dev, dtype=xdt, requires_grad=True)
    ctx = torch.randn(nctx, dctx, device=dev, dtype=xdt, requires_grad=True) if cross else None
    rows = (n, nctx if cross else n, nctx if cross else n)
    gys = [torch.randn(r, d, device=dev, dtype=torch.bfloat16) for r in rows]
    reps = 2 if mixed else 1
    with graph_policy.graph_step(), casts.step_casts(grad_sink=mixed), torch.autocast(
            dev, dtype=torch.bfloat16, enabled=mixed):
        for _ in range(reps):
            ys = att(x, ctx)
            nodes = [y.grad_fn.name() for y in ys]
            torch.autograd.backward(ys, gys)
    if dev == "cuda":
        torch.cuda.synchronize()
    # float64 from the same values
    names = ("to_q", "to_k", "to_v")
    leaves = {}
    xr = x.detach().double().requires_grad_()
    cr = ctx.detach().double().requires_grad_() if cross else None
    refs, got = [], []
    for name, gy in zip(names, gys):
        lin = getattr(att, name)
        (a,) = lin._lyco_host.adapters
        t = a.tensors()
        dp, up = t["lora_down.weight"], t["lora_up.weight"]
        dr, ur = dp.detach().double().requires_grad_(), up.detach().double().requires_grad_()
        leaves[name] = (dr, ur)
        inp = xr if (name == "to_q" or not cross) else cr
        yr = F.linear(inp, lin.weight.double() + 0.5 * (ur @ dr), lin.bias.double())
        refs.append(yr)
        got.append((dp.grad, up.grad))
    torch.autograd.backward(refs, [g.double() for g in gys])

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    errs = {f"y_{nm[3]}": rel(y, r.detach()) for nm, y, r in zip(names, ys, refs)}
    errs["dx"] = rel(x.grad, xr.grad * reps)
    if cross:
        errs["dctx"] = rel(ctx.grad, cr.grad * reps)
    for nm, (gd, gu) in zip(names, got):
        dr, ur = leaves[nm]
        errs[f"dD_{nm[3]}"] = rel(gd, dr.grad * reps)
        errs[f"dU_{nm[3]}"] = rel(gu, ur.grad * reps)
    return sorted(set(nodes)), x.grad.dtype, errs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tol", type=float, default=2e-2)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    print(f"{torch.cuda.get_device_name() if a.device == 'cuda' else a.device}, torch {torch.__version__}")
    worst = 0.0
    for case in ("bf16", "mixed"):
        for cross in (False, True):
            for shared in ("1", "0"):
                nodes, dxdt, errs = run(case, cross, shared, a.device)
                label = "own ops" if shared == "0" else "shared"
                print(f"{case:5s} {'cross k/v' if cross else 'self q/k/v'} {label:14s} {','.join(nodes):34s} "
                      f"dx {str(dxdt)[6:]:8s} " + " ".join(f"{k} {v:.1e}" for k, v in errs.items()))
                worst = max(worst, *errs.values())
    print(f"worst relative error {worst:.2e} (tolerance {a.tol})")
    sys.exit(0 if worst <= a.tol else 1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""LoHa's Khatri–Rao pair and LoKr's ``kron(W1, A)`` up (``lyco/algorithms/factor_triton.py``) over the layers of
the benchmark's LoHa / LoKr sets (SD1.5's 192 ``lin`` + 50 ``conv`` layers, bf16; LoHa rank 8 / conv 4, LoKr
factor 8 rank 16), as device time per training step: every layer's build and its backward (``autograd.grad``
with fixed upstream gradients), captured as one CUDA graph and replayed — the torch forms against the kernels
at each launch geometry (``factor_triton._CFG``). Every geometry is checked against the torch forms in fp32
first (values and gradients).

    python benchmarks/factor_kernel_bench.py [--out DIR]
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from _common import capture_graph  # noqa: E402
from dora_kernel_bench import graph_ms  # noqa: E402
from train_step import build_unet, layer_sets  # noqa: E402

from lyco.algorithms import factor_triton as K  # noqa: E402
from lyco.algorithms.factorize import factorization  # noqa: E402
from lyco.algorithms.loha import khatri_rao_cols, khatri_rao_rows  # noqa: E402

CONFIGS = {f"kr{t}-kron{p}": dict(kr_tile=t, kron_programs=p)
           for t, p in ((1024, 64), (512, 32), (512, 64), (512, 128), (256, 64), (256, 256))}


def torch_kr(a1, a2, b1, b2):
    return khatri_rao_rows(a1, a2), khatri_rao_cols(b1, b2)


def torch_kron(w1, a):
    (ol, im), (ok, r) = w1.shape, a.shape
    return torch.mul(w1.reshape(ol, 1, im, 1), a.reshape(1, ok, 1, r)).reshape(ol * ok, im * r)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, the tiny UNet, kernels interpreted (TRITON_INTERPRET=1): the checks only, no timing")
    a = p.parse_args()
    dev, dt = torch.device("cpu" if a.smoke else "cuda"), torch.bfloat16
    unet = build_unet("sd15", a.smoke, dev, dt)
    mods = dict(unet.named_modules())
    sets = layer_sets(unet)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return (0.1 * torch.randn(*shape, generator=g)).to(dev, dt).requires_grad_()

    loha, lokr = [], []
    for name in sets["lin"] + sets["conv"]:
        w = mods[name].weight
        out, flat_in = w.shape[0], w[0].numel()
        r = 8 if name in sets["lin"] else 4
        loha.append(((rnd(out, r), rnd(out, r), rnd(r, flat_in), rnd(r, flat_in)),
                     (rnd(out, r * r).detach(), rnd(r * r, flat_in).detach())))
        out_l, out_k = factorization(out, 8)
        in_m, _ = factorization(w.shape[1], 8)
        lokr.append(((rnd(out_l, in_m), rnd(out_k, 16)), rnd(out, in_m * 16).detach()))
    del unet
    print(f"{len(loha)} layers", flush=True)

    def run(fn_kr, fn_kron, which):
        def step():
            if which in ("loha", "all"):
                for ins, gs in loha:
                    torch.autograd.grad(fn_kr(*ins), ins, gs)
            if which in ("lokr", "all"):
                for ins, gu in lokr:
                    torch.autograd.grad(fn_kron(*ins), ins, gu)
        return step

    def check():
        worst = 0.0
        for (ins, gs), (kins, gu) in zip(loha, lokr):
            for fk, ft, i, go in ((K.khatri_rao, torch_kr, ins, gs), (K.kron_up, torch_kron, kins, (gu,))):
                got = fk(*i)
                got = got if isinstance(got, tuple) else (got,)
                f32 = [t.detach().float().requires_grad_() for t in i]
                ref = ft(*f32)
                ref = ref if isinstance(ref, tuple) else (ref,)
                pairs = list(zip(got, ref))
                grads = torch.autograd.grad(ref, f32, [x.float() for x in go])
                pairs += list(zip(torch.autograd.grad(got, i, go), grads))
                worst = max([worst] + [((x.float() - y).abs().max() / y.abs().max()).item() for x, y in pairs])
        return worst

    if a.smoke:
        for cname, cfg in CONFIGS.items():
            K._CFG.update(cfg)
            print(f"{cname:18s} err {check():.1e}", flush=True)
        return
    results = {"device": torch.cuda.get_device_name(), "layers": len(loha), "configs": {}}
    ms = {w: graph_ms(run(torch_kr, torch_kron, w)) for w in ("loha", "lokr", "all")}
    results["torch"] = ms
    print(f"{'torch':18s} loha {ms['loha']:.2f}  lokr {ms['lokr']:.2f}  all {ms['all']:.2f} ms", flush=True)
    for cname, cfg in CONFIGS.items():
        K._CFG.update(cfg)
        err = check()
        ms = {w: graph_ms(run(K.khatri_rao, K.kron_up, w)) for w in ("loha", "lokr", "all")}
        results["configs"][cname] = dict(cfg=cfg, ms=ms, max_rel_err=err)
        print(f"{cname:18s} loha {ms['loha']:.2f}  lokr {ms['lokr']:.2f}  all {ms['all']:.2f} ms  err {err:.1e}",
              flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "factor_kernel_bench.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The low-rank bypass op under ``lyco train``'s mixed precision (bf16 base under autocast, fp32 LoRA held by
FlatAdamW) on the GPU, inside ``casts.step_casts``, against float64 math — issue 7, NOTES changes 83–85.

On CUDA the factors' gradients (and a linear layer's ∂x where its input is fp32, a norm's output under autocast;
with ``grad_sink`` added into the parameters' existing gradients, NOTES change 85) come out of their GEMMs in fp32 (``lowrank._out_dtype_ok``: torch's ``mm``/``addmm`` with ``out_dtype``), which the
CPU tests cannot reach; this checks those numbers before the trainer is timed with them, and prints the same errors
with the old form (bf16 GEMM output cast to fp32) beside them.

    python benchmarks/experiments/op_fp32_grads.py        # exit 1 if any relative error exceeds --tol
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
from lyco.algorithms import casts, lowrank  # noqa: E402
from lyco.optim import FlatAdamW  # noqa: E402

CASES = {  # name: (layer, input shape); "fp32-in": the input in fp32, as a norm's output under autocast
    "linear 8192x320->320": (lambda: nn.Linear(320, 320), (8192, 320)),
    "linear fp32-in 8192x320->320": (lambda: nn.Linear(320, 320), (8192, 320)),
    "linear sink 8192x320->320": (lambda: nn.Linear(320, 320), (8192, 320)),
    "linear-wide sink 2048x320->2560": (lambda: nn.Linear(320, 2560), (2048, 320)),
    "linear-wide 2048x320->2560": (lambda: nn.Linear(320, 2560), (2048, 320)),
    "conv3x3 2x64x32x32": (lambda: nn.Conv2d(64, 64, 3, padding=1), (2, 64, 32, 32)),
    "conv1x1 2x128x32x32": (lambda: nn.Conv2d(128, 96, 1), (2, 128, 32, 32)),
}


def run(make, shape, rank, alpha, fp32_gemm: bool, dev: str, x32: bool = False, sink: bool = False):
    """One layer's op against float64; ``sink``: the factors' gradients added by their GEMMs into gradients that
    exist before the step (``step_casts(grad_sink=True)``), over two identical micro-batches (twice the reference)."""
    torch.manual_seed(0)
    layer = make()
    model = nn.Sequential(layer).to(dev)
    net = lyco.create(model, preset="full", algo="lora", rank=rank, alpha=alpha, seed=1)
    model.to(torch.bfloat16)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.data = p.data.float() + 0.05 * torch.randn(p.shape, device=dev)
    params = list(net.trainable_parameters())
    FlatAdamW(params, lr=1e-3)
    (a,) = layer._lyco_host.adapters
    t = a.tensors()
    down_p, up_p = t["lora_down.weight"], t["lora_up.weight"]
    x = torch.randn(shape, device=dev)
    x = (x if x32 else x.bfloat16()).requires_grad_()
    with torch.autocast(dev, dtype=torch.bfloat16):
        gy = torch.randn_like(model(x).float()).bfloat16()
    lowrank._OUT_DTYPE.clear()
    if not fp32_gemm:
        lowrank._OUT_DTYPE[(dev, torch.bfloat16, torch.float32)] = (False, False, False)
    if sink:
        for p in params:
            p.grad = torch.zeros_like(p)
    SUNK[0] = 0
    with casts.step_casts(grad_sink=sink), torch.autocast(dev, dtype=torch.bfloat16):
        for _ in range(2 if sink else 1):
            y = model(x)
            node = y.grad_fn.name()
            y.backward(gy)
    got = [y.detach(), x.grad, down_p.grad, up_p.grad]
    # float64: y = op(x, W + s·U·D, b) from the same values (the bf16 base, the fp32 adapter)
    xr = x.detach().double().requires_grad_()
    dr, ur = down_p.detach().double().requires_grad_(), up_p.detach().double().requires_grad_()
    s = alpha / rank
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    dw = s * (ur.reshape(ur.shape[0], -1) @ dr.reshape(dr.shape[0], -1))
    if isinstance(layer, nn.Linear):
        yr = F.linear(xr, w + dw, b)
    else:
        yr = F.conv2d(xr, w + dw.reshape(w.shape), b, layer.stride, layer.padding)
    ref = [yr.detach()] + [g * (2 if sink else 1) for g in torch.autograd.grad(yr, [xr, dr, ur], gy.double())]
    errs = [((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(got, ref)]
    return node, [g.dtype for g in got[1:]], errs


#: calls of lowrank._mm that added into a parameter's gradient (the sink engaged), per run
SUNK = [0]
_mm = lowrank._mm


def _counting_mm(a, b, s, dt=None, into=None):
    SUNK[0] += into is not None
    return _mm(a, b, s, dt, into)


lowrank._mm = _counting_mm


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tol", type=float, default=2e-2)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (no out_dtype GEMMs there)")
    args = ap.parse_args()
    lowrank.bypass_pays = lambda spec, x, grouped=False: True
    dev = args.device
    print(f"{torch.cuda.get_device_name() if dev == 'cuda' else dev}, torch {torch.__version__}")
    worst = 0.0
    for name, (make, shape) in CASES.items():
        for rank, alpha in ((16, 16.0), (16, 8.0)):
            for fp32 in (True, False):
                node, dts, errs = run(make, shape, rank, alpha, fp32, dev, "fp32-in" in name, "sink" in name)
                ok = lowrank._OUT_DTYPE.get((dev, torch.bfloat16, torch.float32))
                if "sink" in name:
                    ok = f"{ok}, GEMMs that added into .grad: {SUNK[0]}"
                print(f"{name:28s} s={alpha / rank:<4} {'fp32 GEMM' if fp32 else 'bf16+cast'} (out_dtype {ok}) "
                      f"{node} grads {[str(d)[6:] for d in dts]}  rel err y {errs[0]:.1e} dx {errs[1]:.1e} "
                      f"dD {errs[2]:.1e} dU {errs[3]:.1e}")
                worst = max(worst, *errs)
    print(f"worst relative error {worst:.2e} (tolerance {args.tol})")
    sys.exit(0 if worst <= args.tol else 1)


if __name__ == "__main__":
    main()

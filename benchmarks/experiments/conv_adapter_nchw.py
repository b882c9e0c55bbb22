#!/usr/bin/env python3
"""What LoCon's conv adapters would cost without cuDNN's layout conversions (issue 7 "Next"; run 64).

For the 50 k×k convs of SD1.5's ``lin+conv`` set (input shapes recorded from one UNet forward at batch 8,
512 px), the adapter ``y += U·conv(x, D)`` (rank 8, 1×1 up) forward and backward (∂x, ∂D, ∂U), every layer once,
as one CUDA graph, two ways:

* ``cudnn`` — what lyco runs: ``F.conv2d`` for the down (cuDNN converts the NCHW input to NHWC and back around
  it, forward and both backward passes), the up as a batched GEMM;
* ``nchw`` — the down as one batched GEMM over the taps on the NCHW input in place (``G = D_taps·x``, G has
  r·k² channels), then the taps summed shifted (a strided view of the zero-padded G, one reduction), backward
  by hand (∂G by one strided copy into a zeroed buffer, then ∂x = D_tapsᵀ·∂G and ∂D = ∂G·xᵀ as GEMMs).

Checks ``nchw`` against ``cudnn`` in fp32 first (outputs and the three gradients). A measurement for the next
step, not a code path of lyco.

    python benchmarks/experiments/conv_adapter_nchw.py [--out DIR]
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
from dora_kernel_bench import graph_ms  # noqa: E402
from train_step import build_unet, layer_input_shapes, layer_sets  # noqa: E402


class _TapSum(torch.autograd.Function):
    """h[n,ρ,oy,ox] = Σ_{ty,tx} Gp[n,ρ,(ty,tx), oy·s + ty, ox·s + tx] for the zero-padded G (N, r, k², H+2p, W+2p)."""

    @staticmethod
    def forward(ctx, gp, k, s, ho, wo):
        n, r, t, hp, wp = gp.shape
        p_ = hp * wp
        st = gp.stride()
        view = gp.as_strided((n, r, ho, wo, k, k), (st[0], st[1], s * wp, s, k * p_ + wp, p_ + 1))
        ctx.geom = (gp.shape, gp.stride(), (n, r, ho, wo, k, k), (st[0], st[1], s * wp, s, k * p_ + wp, p_ + 1))
        return view.sum((-2, -1))

    @staticmethod
    def backward(ctx, gh):
        shape, stride, vsize, vstride = ctx.geom
        g = gh.new_zeros(shape)
        g.as_strided(vsize, vstride).copy_(gh[..., None, None].expand(vsize))
        return g, None, None, None, None


def down_nchw(x, d, stride, padding):
    n, c, h, w = x.shape
    r, _, k, _ = d.shape
    taps = d.permute(0, 2, 3, 1).reshape(r * k * k, c)             # rows (ρ, ty, tx)
    g = torch.matmul(taps, x.reshape(n, c, h * w))                  # (N, r·k², H·W), x read in place
    # contiguous: F.pad keeps a channels-last-looking input's layout (1×1 spatial), the tap view assumes rows
    gp = F.pad(g.view(n, r * k * k, h, w), (padding,) * 4).contiguous().view(n, r, k * k, h + 2 * padding,
                                                                            w + 2 * padding)
    ho = (h + 2 * padding - k) // stride + 1
    wo = (w + 2 * padding - k) // stride + 1
    return _TapSum.apply(gp, k, stride, ho, wo)


def down_cudnn(x, d, stride, padding):
    return F.conv2d(x, d, None, stride, padding)


def adapter(down, x, d, u, stride, padding):
    h = down(x, d, stride, padding)
    n, r, ho, wo = h.shape
    return torch.matmul(u, h.reshape(n, r, ho * wo)).view(n, -1, ho, wo)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="CPU, the tiny UNet: the shapes and the check, no timing")
    a = p.parse_args()
    dev, dt = torch.device("cpu" if a.smoke else "cuda"), torch.bfloat16
    unet = build_unet("sd15", a.smoke, dev, dt)
    mods = dict(unet.named_modules())
    shapes = layer_input_shapes(unet, layer_sets(unet)["conv"], 2 if a.smoke else 8, 8 if a.smoke else 64, dev, dt)
    g = torch.Generator(device="cpu").manual_seed(0)
    layers = []
    for name, shp in shapes.items():
        m = mods[name]
        d = (0.05 * torch.randn(a.rank, m.in_channels, *m.kernel_size, generator=g)).to(dev, dt).requires_grad_()
        u = (0.05 * torch.randn(m.out_channels, a.rank, generator=g)).to(dev, dt).requires_grad_()
        x = torch.randn(*shp, generator=g).to(dev, dt).requires_grad_()
        layers.append((x, d, u, m.stride[0], m.padding[0]))
    del unet
    gys = [torch.randn_like(adapter(down_cudnn, *ly)) for ly in layers]
    print(f"{len(layers)} conv layers, inputs {sum(ly[0].numel() for ly in layers) * 2 / 2**30:.2f} GiB bf16",
          flush=True)

    worst = 0.0
    for (x, d, u, s, pd), gy in zip(layers, gys):
        x32, d32, u32 = (t.detach().float().requires_grad_() for t in (x, d, u))
        outs = []
        for down in (down_cudnn, down_nchw):
            y = adapter(down, x32, d32, u32, s, pd)
            outs.append((y, *torch.autograd.grad(y, (x32, d32, u32), gy.float())))
        worst = max([worst] + [((b - c).abs().max() / c.abs().max()).item() for b, c in zip(outs[1], outs[0])])
    print(f"nchw vs cudnn in fp32: max relative error {worst:.1e}", flush=True)
    if a.smoke:
        return

    def step(down, which):
        def run():
            for (x, d, u, s, pd), gy in zip(layers, gys):
                y = adapter(down, x, d, u, s, pd)
                if which == "all":
                    torch.autograd.grad(y, (x, d, u), gy)
        return run

    res = {"device": torch.cuda.get_device_name(), "layers": len(layers), "max_rel_err_fp32": worst}
    for name, down in (("cudnn", down_cudnn), ("nchw", down_nchw)):
        res[name] = {w: graph_ms(step(down, w)) for w in ("fwd", "all")}
        print(f"{name:6s} forward {res[name]['fwd']:.2f} ms, forward + backward {res[name]['all']:.2f} ms per step",
              flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "conv_adapter_nchw.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

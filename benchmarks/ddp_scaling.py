"""DDP scaling of lyco adapter training through accelerate (any number of GPUs).

Launched once per process count by ``benchmarks/run_ddp.sh`` (or by hand):

    accelerate launch --multi_gpu --num_processes N benchmarks/ddp_scaling.py --algo lora --out DIR
    accelerate launch --cpu --num_processes 2 benchmarks/ddp_scaling.py --smoke --out DIR   # CPU, gloo

What one run does, on an SD1.5-sized UNet2DConditionModel built from the real config (random
weights, bf16, frozen) with a lyco adapter (fp32 parameters, bf16 autocast):
  * throughput: per-GPU batch B of synthetic latents / text states / timesteps, warm-up, then
    timed steps (forward + backward + AdamW step + DDP all-reduce); images/s over all ranks;
  * equivalence: ``--equiv-steps`` steps on a fixed *global* batch (each rank takes its slice of
    the same seeded batch) and the adapter tensors written by rank 0 to ``adapter_N.safetensors``,
    so the driver can compare the N-GPU adapter with the 1-GPU one.
No communication code of our own: accelerate wraps the module that owns the adapter in DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn as nn


class Wrapper(nn.Module):
    """What DDP wraps: the UNet (frozen, not a parameter owner for DDP) and the adapter network."""

    def __init__(self, unet, net):
        super().__init__()
        object.__setattr__(self, "unet", unet)  # not a child: its frozen weights are not DDP's business
        self.net = net

    def forward(self, latents, t, ctx):
        return self.unet(latents, t, encoder_hidden_states=ctx).sample


def global_batch(step: int, n: int, shape, ctx_shape, seed: int, device, dtype):
    g = torch.Generator().manual_seed(seed * 100003 + step)
    lat = torch.randn((n,) + shape, generator=g)
    ctx = torch.randn((n,) + ctx_shape, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn((n,) + shape, generator=g)
    return lat.to(device, dtype), t.to(device), ctx.to(device, dtype), noise.to(device, dtype)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--algo", default="lora", choices=["lora", "lokr", "loha", "full"])
    p.add_argument("--batch", type=int, default=8, help="per-process batch for throughput")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--equiv-steps", type=int, default=4)
    p.add_argument("--equiv-global-batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny UNet on CPU (gloo)")
    p.add_argument("--static-graph", action="store_true",
                   help="DDP static_graph + gradient_as_bucket_view (fewer hooks, no grad copies)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args()

    from accelerate import Accelerator
    import lyco
    from lyco.formats.safetensors_io import save_tensors

    from accelerate.utils import DistributedDataParallelKwargs
    handlers = [DistributedDataParallelKwargs(static_graph=True, gradient_as_bucket_view=True)] if a.static_graph else []
    acc = Accelerator(mixed_precision="no" if a.smoke else "bf16", kwargs_handlers=handlers)
    world, rank = acc.num_processes, acc.process_index
    torch.manual_seed(a.seed)
    if a.smoke:
        from lyco.models.tiny import tiny_components
        unet = tiny_components("sd1", seed=a.seed)["unet"]
        dtype = torch.float32
    else:
        from lyco.models import configs
        # meta-device build, then random weights drawn directly on the device (same seed on every rank)
        unet = configs.build_unet("sd1", device="meta").to_empty(device=acc.device).to(torch.bfloat16)
        g = torch.Generator(device=acc.device).manual_seed(a.seed)
        with torch.no_grad():
            for prm in unet.parameters():
                prm.normal_(0.0, 0.02, generator=g)
            for buf in unet.buffers():
                buf.zero_()
        dtype = torch.bfloat16
    unet.to(acc.device)
    cfg = unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    ctx_shape = (77, cfg.cross_attention_dim)
    kw = dict(algo=a.algo, rank=16, alpha=16, preset="attn-mlp", seed=a.seed)
    if a.algo == "lokr":
        kw.update(factor=8, rank=8, alpha=8)
    net = lyco.create({"unet": unet}, **kw)
    g = torch.Generator().manual_seed(a.seed + 1)
    with torch.no_grad():  # identical non-zero start on every rank
        for prm in net.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
    model = Wrapper(unet, net)
    opt = torch.optim.AdamW(net.trainable_parameters(), lr=1e-4)
    model, opt = acc.prepare(model, opt)

    def step(lat, t, ctx, noise):
        with acc.autocast():
            pred = model(lat + noise, t, ctx)
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    # -- equivalence: the same global batch split over the ranks ---------------------------
    gb = a.equiv_global_batch
    assert gb % world == 0, "global batch must divide by the number of processes"
    per = gb // world
    for s in range(a.equiv_steps):
        lat, t, ctx, noise = global_batch(s, gb, shape, ctx_shape, a.seed, acc.device, dtype)
        sl = slice(rank * per, (rank + 1) * per)
        step(lat[sl], t[sl], ctx[sl], noise[sl])
    acc.wait_for_everyone()
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in unwrapped.net.state_dict().items()}
        os.makedirs(a.out, exist_ok=True)
        tag = a.algo + ("-static" if a.static_graph else "")
        save_tensors(tensors, os.path.join(a.out, f"adapter_{tag}_{world}.safetensors"), {}, overwrite=True)

    # -- throughput ------------------------------------------------------------------------
    lat, t, ctx, noise = global_batch(10_000 + rank, a.batch, shape, ctx_shape, a.seed, acc.device, dtype)
    for _ in range(a.warmup):
        step(lat, t, ctx, noise)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    acc.wait_for_everyone()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step(lat, t, ctx, noise)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    acc.wait_for_everyone()
    dt = time.perf_counter() - t0
    if acc.is_main_process:
        res = {"algo": a.algo + ("-static" if a.static_graph else ""), "processes": world, "per_process_batch": a.batch, "steps": a.steps,
               "seconds": dt, "images_per_s": world * a.batch * a.steps / dt, "step_ms": 1000 * dt / a.steps,
               "loss": float(loss.detach()), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
               "adapter_params": sum(p.numel() for p in net.trainable_parameters())}
        with open(os.path.join(a.out, f"ddp_{res['algo']}_{world}.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res))


if __name__ == "__main__":
    main()

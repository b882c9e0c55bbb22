"""Multi-GPU scaling of lyco adapter training: DDP settings, 1-vs-N equivalence, FSDP.

Launched once per process count by ``benchmarks/run_ddp.sh`` (or by hand)::

    torchrun --standalone --nproc_per_node N benchmarks/ddp_scaling.py --out DIR [--sdxl-full]
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 benchmarks/ddp_scaling.py --smoke --out DIR   # CPU, gloo

One launch, on an SD1.5-sized UNet built from the real config (random weights, bf16, frozen; ``--smoke``:
the tiny UNet in fp32) with a lyco adapter (fp32 parameters, bf16 autocast), measures for each
algorithm (LoRA r16, LoKr f8 r8 on ``attn-mlp``) and each *variant*:

    none           one process, no DDP (the 1-GPU baseline; only with N = 1)
    independent    every process trains alone, no communication: what sharing the host costs
    default        DDP with accelerate's defaults: broadcast_buffers=True (a buffer broadcast before
                   every forward), gradients copied into buckets, no static graph
    lyco           DDP with the trainer's settings (``lyco.train.loop.ddp_kwargs`` and
                   ``register_ddp_hook``): no buffer broadcast, gradient_as_bucket_view, static_graph,
                   the plain all-reduce hook (no kernel per parameter); gradients zeroed, not freed
    lyco-dynamic   the same without static_graph
    flat           the trainer's ``ddp_comm = "flat"``: no DDP, one all-reduce of all adapter gradients
    <v>+pin        <v> after pinning every thread of each process to its own 1/G of the CPUs (G = GPUs)
    <v>+graph      <v> (none, independent or flat) with forward + backward captured as one CUDA graph per
                   process and replayed (``lyco.train.graphs.GraphedStep``, what ``[train] cuda_graph`` does;
                   the all-reduce, clipping and AdamW stay eager); compared with ``none+graph``. List the
                   +graph variants first: after an eager forward + backward of the same LoRA in the same
                   process, the capture failed on H200 (see lyco/train/graphs.py); the trainer, like these
                   variants, captures before any eager backward

The step is the trainer's: forward under autocast, fp32 MSE, backward (DDP all-reduce), gather of
the loss and a finite check on the host, grad-norm clip at 1.0, AdamW, zeroing of the gradients.
Every process runs with the same number of CPU threads (CPUs / GPUs of the machine) in every launch.

Throughput: per-process batch B of synthetic latents / text states / timesteps (on the device),
warm-up, then ``--windows`` windows of ``--steps`` steps; images/s over all processes of the median
window. Peak memory: ``max_memory_allocated`` (base model included), the largest over processes.

Equivalence (every communicating variant): from the same adapter start and a fixed *global* batch
(each process takes its slice), the gradient after the first backward and the adapter after
``--equiv-steps`` AdamW steps go to ``<work>/grad_<algo>_<variant>_<N>.safetensors`` and
``adapter_…``; ``ddp_summary.py`` compares them with the 1-process run.

``--sdxl-full``: an SDXL-sized UNet with the Full algorithm (``attn-mlp``, a trainable copy of every
adapted weight), per-GPU batch ``--sdxl-batch`` at 1024 px. With N = 1: plain. With N > 1: DDP with the
trainer's settings (when a trial step without communication fits on every process) and FSDP
(``lyco.train.loop.fsdp_shard`` + ``LocalShards``, as the trainer), each with throughput, peak memory
per GPU and a fingerprint of the first gradient (per-tensor norms and random projections) for the
DDP-vs-FSDP check.

Writes ``<out>/ddp_<N>.json`` (rank 0).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.nn as nn
import torch.nn.functional as F

SD15_VARIANTS = ("independent", "default", "lyco", "lyco-dynamic", "flat", "lyco+pin")
EQUIV_VARIANTS = ("none", "default", "lyco", "lyco-dynamic", "flat", "flat+graph")


class Wrapper(nn.Module):
    """What DDP wraps (as the trainer's TrainingModule): the adapter is the only registered child; the
    frozen UNet is referenced. ``register_unet`` (FSDP) makes the UNet a child, to be sharded inside."""

    def __init__(self, unet, net, register_unet: bool = False, sdxl: bool = False):
        super().__init__()
        if register_unet:
            self.unet = unet
        object.__setattr__(self, "_unet", unet)
        self.net = net
        self.sdxl = sdxl

    def forward(self, x, t, ctx, pooled=None, time_ids=None):
        added = {"text_embeds": pooled, "time_ids": time_ids} if self.sdxl else None
        return self._unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample


def batch_of(step: int, n: int, cfg, seed: int, device, dtype, sdxl: bool, res: int):
    """A deterministic synthetic batch of ``n`` (the same on every process for the same step)."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    shape = (n, cfg.in_channels, res, res)
    lat = torch.randn(shape, generator=g)
    ctx = torch.randn((n, 77, cfg.cross_attention_dim), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn(shape, generator=g)
    out = {"x": (lat + noise).to(device, dtype), "t": t.to(device), "ctx": ctx.to(device, dtype),
           "noise": noise.to(device, dtype)}
    if sdxl:  # pooled text embedding: what the add-embedding takes besides the 6 time ids
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        out["pooled"] = torch.randn((n, pooled), generator=g).to(device, dtype)
        out["time_ids"] = torch.tensor([[res * 8, res * 8, 0, 0, res * 8, res * 8]] * n, dtype=torch.float32).to(device)
    return out


def sliced(b: dict, sl: slice) -> dict:
    return {k: v[sl] for k, v in b.items()}


def sync_device():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cpu_slices():
    """Each local process's share of this machine's CPUs (contiguous slices, one per GPU)."""
    cpus = sorted(os.sched_getaffinity(0))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    parts = max(1, gpus)
    k = max(1, len(cpus) // parts)
    return [cpus[i * k:(i + 1) * k] or cpus for i in range(parts)]


ALL_CPUS = sorted(os.sched_getaffinity(0))


def set_affinity(cpus) -> None:
    """Every thread of this process (threads started later inherit it) on ``cpus``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def pin_process(local_rank: int) -> list[int]:
    """Pin this process to its own CPU slice (one slice per GPU of the machine)."""
    slices = cpu_slices()
    mine = slices[local_rank % len(slices)]
    set_affinity(mine)
    return mine


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algos", default="lora,lokr")
    p.add_argument("--variants", default=None, help="comma list (default: none,none+pin with 1 process; "
                   + ",".join(SD15_VARIANTS) + " otherwise)")
    p.add_argument("--batch", type=int, default=8, help="per-process batch for throughput")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="steps per timed window")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--equiv-steps", type=int, default=3)
    p.add_argument("--equiv-global-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sdxl-full", action="store_true", help="also SDXL-sized Full: DDP vs FSDP (1 process: plain)")
    p.add_argument("--sdxl-batch", type=int, default=2)
    p.add_argument("--sdxl-steps", type=int, default=3, help="SDXL: steps per timed window (2 windows, 2 warm-up)")
    p.add_argument("--sdxl-res", type=int, default=128, help="latent side (128 = 1024 px)")
    p.add_argument("--smoke", action="store_true", help="tiny UNets, fp32, CPU/gloo (checks the plumbing)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--work", default=None, help="folder for gradients/adapters of the equivalence (default: --out)")
    a = p.parse_args()
    if a.smoke:  # a plumbing check: few steps, one thread per process
        a.warmup, a.windows, a.steps, a.sdxl_steps = 1, 2, 2, 1
    work = a.work or a.out
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(work, exist_ok=True)

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
    import lyco
    from lyco.formats.safetensors_io import save_tensors
    from lyco.train.config import DistributedConfig
    from lyco.train.graphs import GraphedStep
    from lyco.train.loop import (FlatGradSync, LocalShards, clip_grad_norm, ddp_kwargs, fsdp_shard, full_tensor,
                                 register_ddp_hook)

    # a hang (one process out of memory while the others wait in a collective) fails after 5 minutes
    acc = Accelerator(mixed_precision="no" if a.smoke else "bf16",
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=300))])
    world, rank, local_rank = acc.num_processes, acc.process_index, acc.local_process_index
    dev = acc.device
    dtype = torch.float32 if a.smoke else torch.bfloat16
    threads = 1 if a.smoke else len(cpu_slices()[0])
    torch.set_num_threads(threads)
    variants = a.variants.split(",") if a.variants else (["none", "none+pin"] if world == 1 else list(SD15_VARIANTS))
    if world == 1 and any(v.split("+")[0] not in ("none",) for v in variants):
        raise SystemExit("with 1 process only the variants none and none+pin exist")
    if world > 1 and "none" in [v.split("+")[0] for v in variants]:
        raise SystemExit("'none' is the 1-process baseline; use 'independent' with several processes")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"

    def log(*msg):
        if rank == 0:
            print(f"[{time.strftime('%H:%M:%S')}] N={world}", *msg, flush=True)

    def peak_all() -> float | None:
        if not torch.cuda.is_available():
            return None
        t = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=dev)
        if world > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t)

    def reset_peak():
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    meta = {"processes": world, "device": gpu, "torch": torch.__version__, "cpus_per_process": threads,
            "cpu_affinity": len(os.sched_getaffinity(0)), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "per_process_batch": a.batch, "smoke": a.smoke}
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        meta["gpus_on_machine"] = n
        meta["peer_access"] = [[i == j or torch.cuda.can_device_access_peer(i, j) for j in range(n)] for i in range(n)]
        try:
            meta["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001
            pass
    res: dict = {"meta": meta, "runs": [], "comm": [], "sdxl_full": []}
    out_path = os.path.join(a.out, f"ddp_{world}.json")

    def flush():  # after every result, so that a launch cut short still leaves what it measured
        if rank == 0:
            with open(out_path + ".tmp", "w") as f:
                json.dump(res, f, indent=1)
            os.replace(out_path + ".tmp", out_path)

    # -- the model -------------------------------------------------------------------------
    from lyco.models import configs

    def build_unet(family: str):
        if a.smoke:
            from lyco.models.tiny import tiny_components
            u = tiny_components("sdxl" if family == "sdxl" else "sd1", seed=a.seed)["unet"].to(dev)
        else:  # meta-device build, random weights drawn on the device (the same seed on every process)
            u = configs.build_unet(family, device="meta").to_empty(device=dev).to(dtype)
            g = torch.Generator(device=dev).manual_seed(a.seed)
            with torch.no_grad():
                for prm in u.parameters():
                    prm.normal_(0.0, 0.02, generator=g)
                for buf in u.buffers():
                    buf.zero_()
        u.requires_grad_(False)
        return u

    # -- communication alone ---------------------------------------------------------------
    def comm_bench(nbytes: int, label: str):
        x = torch.ones(nbytes // 4, device=dev)
        for _ in range(3):
            torch.distributed.all_reduce(x)
        sync_device()
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            torch.distributed.all_reduce(x)
            sync_device()
            ts.append(time.perf_counter() - t0)
        ms = 1000 * statistics.median(ts)
        res["comm"].append({"what": label, "bytes": nbytes, "all_reduce_ms": ms,
                            "bus_GBps": 2 * (world - 1) / world * nbytes / (ms / 1000) / 1e9})
        flush()
        log(f"all-reduce {label} {nbytes / 2**20:.1f} MiB: {ms:.3f} ms")

    # -- one training step as the trainer does it ---------------------------------------------
    host_ms: list[float] = []  # CPU time to queue forward + backward (until the first host sync)

    def make_step(model, params, opt, *, sync=None, comm=True, to_none=True, shards=None, graph=False):
        def fwd_bwd(b):
            with acc.autocast():
                pred = model(b["x"], b["t"], b["ctx"], b.get("pooled"), b.get("time_ids"))
            loss = F.mse_loss(pred.float(), b["noise"].float())
            loss.backward()
            return loss.detach()

        if graph:  # the trainer's [train] cuda_graph: gradients accumulate in place, so they are zeroed, not freed
            fwd_bwd = GraphedStep(fwd_bwd, params)
            to_none = False
            if sync is not None:  # as the trainer: gradients as views of flat buffers, all-reduced in place
                fwd_bwd.ensure_grads()  # (runs 4-5 of ddp_scaling_h200x2 predate this: they copied)
                sync.adopt(fwd_bwd.flat_grads)

        def step(b):
            t0 = time.perf_counter()
            loss = fwd_bwd(b)
            host_ms.append(1000 * (time.perf_counter() - t0))
            if sync is not None:
                sync.sync()
            lv = loss.detach().float().reshape(1)
            allv = acc.gather(lv) if comm and world > 1 else lv
            if not bool(torch.isfinite(allv).all()):
                raise RuntimeError("non-finite loss")
            if shards is not None:
                clip_grad_norm(params, 1.0)
                shards.grads_to_local()
            else:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=to_none)
            if shards is not None:
                shards.zero_grad()
            return loss
        step.graphed = fwd_bwd if graph else None
        return step

    def timed(step, b, label: str, n_imgs: int, warmup=None, windows=None, steps=None):
        warmup, windows, steps = warmup or a.warmup, windows or a.windows, steps or a.steps
        for _ in range(warmup):
            step(b)
        sync_device()
        acc.wait_for_everyone()
        rates, ms = [], []
        host_ms.clear()
        for _ in range(windows):
            sync_device()
            acc.wait_for_everyone()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(b)
            sync_device()
            acc.wait_for_everyone()
            dt = time.perf_counter() - t0
            rates.append(n_imgs * steps / dt)
            ms.append(1000 * dt / steps)
        med = statistics.median(rates)
        host = statistics.median(host_ms) if host_ms else None
        log(f"{label}: {med:.1f} images/s ({statistics.median(ms):.1f} ms/step, host queues fwd+bwd in "
            f"{host:.1f} ms; windows {', '.join(f'{r:.1f}' for r in rates)})")
        return {"images_per_s": med, "step_ms": statistics.median(ms), "host_fwd_bwd_ms": host,
                "window_images_per_s": rates}

    def wrap(variant: str, unet, net, sdxl: bool = False):
        """(model, sync, comm, to_none) of a variant."""
        base = variant.split("+")[0]
        model = Wrapper(unet, net, sdxl=sdxl)
        if base in ("none", "independent"):
            return model, None, False, True
        if base == "flat":
            s = FlatGradSync(list(net.parameters()))
            s.broadcast_parameters()
            return model, s, True, True
        if base == "default":
            kw = {}
        else:
            kw = ddp_kwargs(DistributedConfig(ddp_static_graph=base == "lyco"), find_unused=False)
        acc.ddp_handler = DistributedDataParallelKwargs(**kw)
        model = acc.prepare_model(model)
        if base != "default":
            register_ddp_hook(model)
        to_none = not kw.get("gradient_as_bucket_view", False)
        return model, None, True, to_none

    def unwrap_all():
        acc._models.clear()
        gc.collect()

    if world > 1:
        big = 256 << 20 if not a.smoke else 4 << 20
        comm_bench(big, f"{big >> 20} MiB buffer")

    # -- SD1.5: LoRA and LoKr ---------------------------------------------------------------------
    unet = build_unet("sd1")
    cfg = unet.config
    res_px = 8 if a.smoke else cfg.sample_size
    gb = a.equiv_global_batch
    if gb % world:
        raise SystemExit(f"--equiv-global-batch {gb} must divide by the number of processes {world}")
    per = gb // world
    pinned = None
    for algo in [x for x in a.algos.split(",") if x]:  # --algos "" runs only the SDXL part
        kw = dict(algo=algo, rank=16, alpha=16, preset="attn-mlp", seed=a.seed)
        if algo == "lokr":
            kw.update(factor=8, rank=8, alpha=8)
        net = lyco.create({"unet": unet}, **kw)
        net.to(dev)
        params = [q for q in net.parameters() if q.requires_grad]
        if world > 1:
            comm_bench(4 * sum(q.numel() for q in params), f"{algo} gradients (fp32)")
        g = torch.Generator().manual_seed(a.seed + 1)
        with torch.no_grad():  # identical non-zero start on every process
            init = [(torch.randn(q.shape, generator=g) * 0.02).to(dev) for q in params]
        thr_batch = batch_of(10_000 + rank, a.batch, cfg, a.seed, dev, dtype, False, res_px)
        for variant in variants:
            graph = "+graph" in variant
            if graph and (a.smoke or not torch.cuda.is_available()):
                log(f"{algo} {variant}: skipped (CUDA graphs need a GPU)")
                continue
            if graph and variant.split("+")[0] not in ("none", "independent", "flat"):
                raise SystemExit(f"{variant}: +graph goes with none, independent or flat (DDP's hooks would fire "
                                 f"inside the captured backward)")
            if variant.endswith("+pin") and pinned is None:
                pinned = pin_process(local_rank)
                log(f"pinned: process {local_rank} on CPUs {pinned[0]}-{pinned[-1]}")
            elif not variant.endswith("+pin") and pinned is not None:
                set_affinity(ALL_CPUS)
                pinned = None
            reset_peak()
            with torch.no_grad():
                for q, v in zip(params, init):
                    q.copy_(v)
            model, sync, comm, to_none = wrap(variant, unet, net)
            row = {"algo": algo, "variant": variant, "processes": world, "per_process_batch": a.batch,
                   "adapter_params": sum(q.numel() for q in params), "device": gpu}
            if variant in EQUIV_VARIANTS:
                opt = torch.optim.AdamW(params, lr=1e-4)
                step = make_step(model, params, opt, sync=sync, comm=comm, to_none=to_none, graph=graph)
                sl = slice(rank * per, (rank + 1) * per)
                for s in range(a.equiv_steps):
                    b = sliced(batch_of(s, gb, cfg, a.seed, dev, dtype, False, res_px), sl)
                    if s == 0:  # the first gradient, after the all-reduce, before clipping/optimizer
                        if graph:  # the gradient the graph computes (capture + one replay)
                            step.graphed(b)
                        else:
                            with acc.autocast():
                                pred = model(b["x"], b["t"], b["ctx"])
                            F.mse_loss(pred.float(), b["noise"].float()).backward()
                        if sync is not None:
                            sync.sync()
                        if rank == 0:
                            grads = {f"{i:04d}": q.grad.detach().float().cpu().contiguous()
                                     for i, q in enumerate(params)}
                            save_tensors(grads, os.path.join(work, f"grad_{algo}_{variant}_{world}.safetensors"), {},
                                         overwrite=True)
                        opt.zero_grad(set_to_none=to_none and not graph)
                    step(b)
                if rank == 0:
                    ad = {f"{i:04d}": q.detach().float().cpu().contiguous() for i, q in enumerate(params)}
                    save_tensors(ad, os.path.join(work, f"adapter_{algo}_{variant}_{world}.safetensors"), {},
                                 overwrite=True)
                del opt, step
            opt = torch.optim.AdamW(params, lr=1e-4)
            step = make_step(model, params, opt, sync=sync, comm=comm, to_none=to_none, graph=graph)
            row.update(timed(step, thr_batch, f"{algo} {variant}", a.batch * world))
            if step.graphed is not None:  # did the graph run, or fall back to eager?
                gs = step.graphed
                row["graph"] = {"captures": gs.captures, "replays": gs.replays, "eager_calls": gs.eager_calls,
                                "disabled_reason": gs.disabled_reason}
                log(f"{algo} {variant} graph: {row['graph']}")
            row["peak_gib"] = peak_all()
            res["runs"].append(row)
            flush()
            for q in params:
                q.grad = None
            del model, sync, opt, step
            unwrap_all()
        net.detach()
        del net, params, init
        reset_peak()
    if pinned is not None:
        set_affinity(ALL_CPUS)
    del unet
    reset_peak()

    # -- SDXL-sized Full: DDP vs FSDP ------------------------------------------------------------
    if a.sdxl_full:
        unet = build_unet("sdxl")
        cfg = unet.config
        res_px = 8 if a.smoke else a.sdxl_res
        net = lyco.create({"unet": unet}, algo="full", preset="attn-mlp", seed=a.seed)
        net.to(dev)
        params = [q for q in net.parameters() if q.requires_grad]
        n_params = sum(q.numel() for q in params)
        log(f"SDXL Full: {n_params / 1e9:.2f} G trainable parameters")
        B = a.sdxl_batch
        gbx = B * world
        thr_batch = batch_of(20_000 + rank, B, cfg, a.seed, dev, dtype, True, res_px)
        eq_batch = sliced(batch_of(7, gbx, cfg, a.seed, dev, dtype, True, res_px), slice(rank * B, (rank + 1) * B))

        def fingerprint(named):
            """Per-tensor norm and one random projection of every gradient (fp64), in name order."""
            norms, proj = [], []
            for i, (_, q) in enumerate(named):
                gr = full_tensor(q.grad).float()
                gg = torch.Generator(device=gr.device).manual_seed(1000 + i)
                r = torch.randn(gr.shape, generator=gg, device=gr.device, dtype=torch.float32)
                norms.append(float(gr.double().norm()))
                proj.append(float((gr * r).double().sum()))
                del gr, r
            return {"norms": norms, "projections": proj}

        def zero_full():
            with torch.no_grad():
                for q in net.parameters():
                    if q.requires_grad:
                        q.zero_()  # Full starts at ΔW = 0: the same start for every run

        def sdxl_run(label, model, step, comm):
            zero_full()
            with acc.autocast():
                pred = model(eq_batch["x"], eq_batch["t"], eq_batch["ctx"], eq_batch["pooled"], eq_batch["time_ids"])
            F.mse_loss(pred.float(), eq_batch["noise"].float()).backward()
            del pred
            fp = fingerprint(list(net.named_parameters())) if world > 1 else None
            for q in net.parameters():
                q.grad = None
            row = {"strategy": label, "processes": world, "per_process_batch": B, "resolution_px": res_px * 8,
                   "trainable_params": n_params, "device": gpu, "fits": True, "fingerprint": fp}
            row.update(timed(step, thr_batch, f"SDXL Full {label}", B * world, warmup=2, windows=2,
                             steps=a.sdxl_steps))
            row["peak_gib"] = peak_all()
            res["sdxl_full"].append(row)
            flush()

        # DDP (plain with one process). First a trial step without communication, so that a process
        # running out of memory cannot leave the others waiting in an all-reduce.
        label = "plain" if world == 1 else "ddp"
        reset_peak()
        ok = torch.ones(1, device=dev)
        try:
            moments = [torch.empty_like(q) for q in params for _ in range(2)]  # AdamW's, held through the step
            trial = Wrapper(unet, net, sdxl=True)
            with acc.autocast():
                pred = trial(thr_batch["x"], thr_batch["t"], thr_batch["ctx"], thr_batch["pooled"],
                             thr_batch["time_ids"])
            F.mse_loss(pred.float(), thr_batch["noise"].float()).backward()
            del pred, trial, moments
        except torch.OutOfMemoryError:
            ok.zero_()
            pred = trial = moments = None  # noqa: F841
        for q in params:
            q.grad = None
        reset_peak()
        if world > 1:
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        if bool(ok.item()):
            model, sync, comm, to_none = wrap("none" if world == 1 else "lyco", unet, net, sdxl=True)
            opt = torch.optim.AdamW(params, lr=1e-5)
            step = make_step(model, params, opt, sync=sync, comm=comm, to_none=to_none)
            sdxl_run(label, model, step, comm)
            for q in params:
                q.grad = None
            del model, opt, step
            unwrap_all()
            reset_peak()
        else:
            res["sdxl_full"].append({"strategy": label, "processes": world, "per_process_batch": B, "fits": False,
                                     "trainable_params": n_params, "device": gpu})
            flush()
            log(f"SDXL Full {label}: does not fit")

        del params  # the unsharded tensors must go once FSDP holds the shards
        if world > 1:  # FSDP as the trainer does it
            root = Wrapper(unet, net, register_unet=True, sdxl=True)
            fsdp_shard(root, unet, net, device=dev, reshard_after_forward=True)
            sparams = [q for q in net.parameters() if q.requires_grad]
            shards = LocalShards(sparams)
            opt = torch.optim.AdamW(shards.local, lr=1e-5)
            step = make_step(root, sparams, opt, comm=True, to_none=True, shards=shards)
            reset_peak()
            sdxl_run("fsdp", root, step, True)

    res["meta"]["complete"] = True
    flush()
    log("wrote", out_path)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""``[train] cuda_graph`` benchmark: lyco's real trainer (``lyco.train.loop.Trainer``), eager vs graph.

What. For every model × algorithm, two trainings from the same seed and data, ``eager`` (the plain
loop) and ``graph`` (``cfg.replace(train={"cuda_graph": True})``: forward+backward of each batch
shape captured once as a CUDA graph and replayed, the optimizer step eager). Per variant:
time per optimizer step and peak GPU memory; per row: the speedup and how far apart the two saved
adapters are (max |a−b| and relative L2 ‖a−b‖/‖a‖ of every tensor of the two ``.safetensors``).

Models (``--models``):
  * ``world``: the shipped pretrained tiny SD1-shaped base (``lyco.world.base.load_pipeline``),
    trained on 32 px images of a world concept (``lyco.world.scene.write_concept_dataset``), the way
    ``lyco eval`` trains it; batch 16.
  * ``sd15``: an SD1.5-sized ``UNet2DConditionModel`` from the real SD1.5 config
    (``lyco.models.configs``, random weights drawn on the device, no download) in a diffusers
    ``StableDiffusionPipeline`` with a small 4-level VAE (×8: 512 px ↔ 64×64×4 latents, cached once
    by the trainer's latent cache, ``[data] cache_latents``), a 1-layer CLIP text encoder of width 768
    (SD1.5's cross-attention width) and the tiny byte-level tokenizer of ``lyco.models.tiny``;
    8 synthetic 512 px images (``lyco.train.synthetic.make_shapes``) with repeats; batch 8.
  * ``sdxl``: the SDXL UNet from its real config the same way, both text encoders cut to one layer at their real
    widths, the same small VAE; 4 synthetic 1024 px images; batch 4.
Algorithms (``--algos``, preset attn-mlp, text encoder trained too, as ``lyco train`` defaults):
lora rank 16, lokr rank 8 factor 8, loha rank 8 (alpha = rank). bf16 mixed precision, AdamW 1e-4.

How. Time: the trainer's ``step`` callback (called once the step's loss was read from the device) stamps
``time.perf_counter()`` (``_common.StepClock``); ms/step = (stamp[warmup+steps] − stamp[warmup]) / steps,
so graph capture (first steps) and setup are excluded. Peak: ``torch.cuda.max_memory_allocated``
reset before the trainer is built (base model, adapter, optimizer, activations, graph pools).
Correctness: both runs train warmup+steps steps and save fp32 adapters; the row fails when the whole
adapter's relative L2 (all tensors) exceeds 1e-3 (``--tol``); the worst single tensor is reported.
``--eager-twice`` adds a second eager run as the run-to-run noise reference (atomics in some backward
kernels are not bit-deterministic on GPU). ``benchmarks/check_cuda_graph.py`` checks the first
gradients, which Adam has not amplified yet.

Results: ``<out>/train_graph.json`` and ``<out>/train_graph.md`` (device, torch, settings, table),
rewritten after every training, so a run cut short keeps what it measured; ``--deadline`` (unix
time) stops starting new rows. Exit 1 (after writing) if a row fails the tolerance or a run raised.

    python benchmarks/train_graph.py --out OUT [--models world,sd15] [--algos lora,lokr,loha]
    python benchmarks/train_graph.py --smoke --out /tmp/tg     # CPU, tiny models, 3 steps, eager only
GPU, one command: ``benchmarks/run_train_graph.sh OUTDIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from _common import StepClock, StepProfiler, format_profile  # noqa: E402  (benchmarks/)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ALGOS = {  # [network] tables
    "lora": {"algo": "lora", "rank": 16, "alpha": 16, "preset": "attn-mlp"},
    "lokr": {"algo": "lokr", "rank": 8, "alpha": 8, "preset": "attn-mlp", "options": {"factor": 8}},
    "loha": {"algo": "loha", "rank": 8, "alpha": 8, "preset": "attn-mlp"},
    "dora": {"algo": "lora", "rank": 16, "alpha": 16, "preset": "attn-mlp", "dora": True},
    "glora": {"algo": "glora", "rank": 8, "alpha": 8, "preset": "attn-mlp"},
    # the output-keeping ops ((IA)³'s, Diag-OFT's: issue 7 changes 108, 126–130) under the trainer's autocast
    "ia3": {"algo": "ia3", "preset": "attn-mlp"},
    "diag-oft": {"algo": "diag-oft", "rank": 16, "preset": "attn-mlp"},
}
BATCH = {"world": 16, "sd15": 8, "sdxl": 4}


# ------------------------------------------------------------------------------------ models, data
def sd15_pipeline(device: str, smoke: bool):
    """A fresh SD1.5-shaped pipeline (deterministic: the same seed on the same device gives the same
    weights); smoke: the tiny SD1 pipeline of ``lyco.models.tiny``."""
    from lyco.models import configs as C, tiny
    if smoke:
        return tiny.tiny_pipeline("sd1", seed=0)
    tok = tiny.tiny_tokenizer()
    te = C.get_config("sd1", "text_encoder")  # CLIP-L, cut to one layer; ids of the tiny vocabulary
    te.update(num_hidden_layers=1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    vae = C.get_config("sd1", "vae")          # 4 levels = ×8 like SD's, at tiny width
    vae.update(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8)
    with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
        torch.manual_seed(0)
        comps = {"unet": C.build_from_config(C.get_config("sd1", "unet"), device=device, dtype=torch.bfloat16),
                 "text_encoder": C.build_from_config(te, device=device, dtype=torch.bfloat16),
                 "vae": C.build_from_config(vae, device=device)}
    return C.assemble_pipeline("sd1", comps, C.build_scheduler("sd1"), tok)


def sdxl_pipeline(device: str, smoke: bool):
    """A fresh SDXL-shaped pipeline: the SDXL UNet from its real config (random weights on the device, bf16), both
    text encoders cut to one layer (their real widths: 768 and 1280, pooled 1280 — what the UNet's cross-attention
    and added embeddings expect), the small ×8 VAE of :func:`sd15_pipeline`; smoke: the tiny SDXL pipeline."""
    from lyco.models import configs as C, tiny
    if smoke:
        return tiny.tiny_pipeline("sdxl", seed=0)
    tok = tiny.tiny_tokenizer()
    ids = dict(num_hidden_layers=1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    te, te2 = C.get_config("sdxl", "text_encoder"), C.get_config("sdxl", "text_encoder_2")
    te.update(ids)
    te2.update(ids)
    vae = C.get_config("sdxl", "vae")
    vae.update(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8)
    with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
        torch.manual_seed(0)
        comps = {"unet": C.build_from_config(C.get_config("sdxl", "unet"), device=device, dtype=torch.bfloat16),
                 "text_encoder": C.build_from_config(te, device=device, dtype=torch.bfloat16),
                 "text_encoder_2": C.build_from_config(te2, device=device, dtype=torch.bfloat16),
                 "vae": C.build_from_config(vae, device=device)}
    return C.assemble_pipeline("sdxl", comps, C.build_scheduler("sdxl"), tok, tok)


def world_template():
    from lyco.world import base
    return base.load_pipeline(device="cpu")  # fp32 on the CPU: deep-copied for every training


def make_data(model: str, root: Path, batch: int, need: int, smoke: bool) -> tuple[Path, int]:
    """``(train_dir, resolution)`` with every batch full (images × repeats a multiple of the batch)
    and at least ``need`` batches per epoch where cheap."""
    n = batch
    repeats = max(1, min(50, math.ceil(need * batch / n)))
    if model == "world":
        from lyco.world import scene
        scene.write_concept_dataset("star", root, n=n, seed=0, repeats=repeats, overwrite=True)
        return root, scene.IMAGE_SIZE
    from lyco.train.synthetic import make_shapes
    size = 32 if smoke else 1024 if model == "sdxl" else 512
    make_shapes(root / f"{repeats}_lycoshape", n, seed=0, sizes=((size, size),))
    return root, size


def train_config(model, algo, train_dir, res, out_dir, cache_dir, a, graph: bool):
    from lyco.train import from_dict
    d = {
        "model": {"path": ""},  # the pipeline is handed to the Trainer
        "data": {"train_dir": str(train_dir), "resolution": [res, res], "enable_bucket": False,
                 "bucket_reso_steps": 8, "min_bucket_reso": res, "max_bucket_reso": res,
                 "cache_dir": str(cache_dir), "trigger_word": "" if model == "world" else "lycoshape"},
        "network": copy.deepcopy(ALGOS[algo]),
        "optimizer": {"learning_rate": a.lr},
        "train": {"max_train_steps": a.warmup + a.steps + a.profile, "batch_size": a.batch or BATCH[model], "seed": 42,
                  "mixed_precision": "bf16", "autocast": not a.no_autocast, "cpu": a.device == "cpu",
                  "conv_weights_channels_last": {"auto": "auto", "false": False}[a.conv_layout]},
        "output": {"output_dir": str(out_dir), "output_name": "adapter", "save_dtype": "fp32",
                   "save_state": False, "overwrite": True, "log_with": "none", "progress_bar": False},
        "eval": {"enabled": False},
    }
    cfg = from_dict(d)
    return cfg.replace(train={"cuda_graph": bool(graph)})  # explicit both ways: the default is "auto"


# ------------------------------------------------------------------------------------ one training
def run_variant(model, algo, variant, ctx, a) -> dict:
    """One training (``variant``: eager, graph, or eager2 = eager again); its timings and adapter path."""
    from lyco.train.loop import Trainer
    cuda = a.device.startswith("cuda")
    if variant == "graph" and not cuda:
        return {"skipped": "needs CUDA"}
    out_dir = ctx["work"] / f"{model}_{algo}_{variant}"
    try:
        cfg = train_config(model, algo, ctx["train_dir"], ctx["res"], out_dir, ctx["work"] / "cache", a,
                           graph=variant == "graph")
    except Exception as e:  # noqa: BLE001 — the option may not exist yet in this checkout
        return {"skipped": f"config: {type(e).__name__}: {e}"}
    pipe = (copy.deepcopy(ctx["template"]) if model == "world" else
            sdxl_pipeline(a.device, a.smoke) if model == "sdxl" else sd15_pipeline(a.device, a.smoke))
    clock = StepClock()
    callbacks = [clock]
    prof = None
    if a.profile:  # the profiled steps come after the timed ones: the timing stays unprofiled
        prof = StepProfiler(a.warmup + a.steps, a.profile)
        callbacks.append(prof)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None  # the pipeline (sd15), or a leak
    t0 = time.perf_counter()
    trainer = Trainer(cfg, pipeline=pipe, callbacks=callbacks)
    try:
        res = trainer.train()
    finally:
        trainer.close()
        with contextlib.suppress(Exception):
            trainer.accelerator.free_memory()
    wall = time.perf_counter() - t0
    w, n = a.warmup, a.steps
    row = {"ms_per_step": clock.ms_per_step(w, n), "median_ms": clock.median_ms(w, n),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "start_gib": start_gib, "wall_s": wall,
           "steps": res.steps, "last_loss": res.losses[-1][1] if res.losses else None,
           "adapter": res.adapter_path, "graph": _graph_evidence(trainer)}
    if prof is not None and prof.result is not None:
        row["profile"] = prof.result
    del trainer, pipe, res
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def _graph_evidence(trainer):
    """What ``[train] cuda_graph`` did (the trainer's ``GraphedStep`` counters), None without one."""
    g = getattr(trainer, "_graph", None)
    return None if g is None else {k: getattr(g, k, None) for k in ("captures", "replays", "eager_calls", "disabled_reason")}


def compare(path_a: str, path_b: str) -> dict:
    """max |a−b| and ‖a−b‖/‖a‖ of every tensor (float64), the worst of each and the whole file."""
    from safetensors.torch import load_file
    ta, tb = load_file(path_a), load_file(path_b)
    if set(ta) != set(tb):
        return {"error": f"different keys: {sorted(set(ta) ^ set(tb))[:5]}"}
    per, num, den = {}, 0.0, 0.0
    for k in sorted(ta):
        x, y = ta[k].double(), tb[k].double()
        d = float((x - y).norm())
        nx = float(x.norm())
        per[k] = [float((x - y).abs().max()) if x.numel() else 0.0, d / nx if nx else (0.0 if d == 0 else math.inf)]
        num, den = num + d * d, den + nx * nx
    worst = max(per, key=lambda k: per[k][1])
    return {"max_abs": max(v[0] for v in per.values()), "rel_l2": max(v[1] for v in per.values()),
            "rel_l2_file": math.sqrt(num / den) if den else 0.0, "worst": worst, "tensors": per}


# ------------------------------------------------------------------------------------ reporting
def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    res = {"meta": meta, "rows": rows}
    profiles = [format_profile(f"{r['model']} {r['algo']} {v}", r[v]["profile"]) for r in rows
                for v in ("eager", "graph", "eager2") if isinstance(r.get(v), dict) and r[v].get("profile")]
    if profiles:
        (out / "profile.txt").write_text("\n\n".join(profiles) + "\n", encoding="utf-8")
    for name, text in (("train_graph.json", json.dumps(res, indent=1, default=str)), ("train_graph.md", markdown(res))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)


def _fmt(v, spec=".1f"):
    return "—" if v is None else format(v, spec)


def _cell(v: dict | None, key: str, spec=".1f"):
    return "—" if not v else "skipped" if "skipped" in v else "error" if "error" in v else _fmt(v.get(key), spec)


def markdown(res: dict) -> str:
    m, s = res["meta"], res["meta"]["settings"]
    lines = [f"# `[train] cuda_graph`: lyco Trainer, eager vs graph", "",
             f"Device: **{m['device']}**, torch {m['torch']}, python {m['python']}, lyco {m['commit']}.  ",
             f"Settings: {'SMOKE (CPU, tiny models: timings mean nothing), ' if s['smoke'] else ''}bf16 mixed precision"
             f"{'' if s.get('autocast', True) else ' without autocast'}, AdamW lr {s['lr']}, {s['warmup']} warm-up + {s['steps']} timed steps "
             f"(the adapters compared after all {s['warmup'] + s['steps']}), batch {s['batch']}, "
             f"algorithms {json.dumps(ALGOS)}; tolerance: whole-adapter rel L2 ≤ {s['tol']}.", "",
             "| model | algo | eager ms/step | graph ms/step | speedup | eager peak GiB | graph peak GiB | "
             "adapter rel L2 (all tensors) | worst tensor rel L2 | eager-twice: all / worst | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        c, n = r.get("cmp") or {}, r.get("noise") or {}
        lines.append(f"| {r['model']} | {r['algo']} | {_cell(r.get('eager'), 'ms_per_step')} | "
                     f"{_cell(r.get('graph'), 'ms_per_step')} | {_fmt(r.get('speedup'), '.2f')}{'×' if r.get('speedup') else ''} | "
                     f"{_cell(r.get('eager'), 'peak_gib', '.2f')} | {_cell(r.get('graph'), 'peak_gib', '.2f')} | "
                     f"{_fmt(c.get('rel_l2_file'), '.2e')} | {_fmt(c.get('rel_l2'), '.2e')} | "
                     f"{_fmt(n.get('rel_l2_file'), '.2e')} / {_fmt(n.get('rel_l2'), '.2e')} | {r['status']} |")
    notes = [f"- {r['model']}/{r['algo']} {v}: {r[v]['skipped' if 'skipped' in r[v] else 'error']}"
             for r in res["rows"] for v in ("eager", "graph", "eager2")
             if isinstance(r.get(v), dict) and ("skipped" in r[v] or "error" in r[v])]
    if m.get("stopped"):
        notes.append(f"- stopped: {m['stopped']}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _commit() -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
    return "?"


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "train_graph_out"))
    p.add_argument("--models", default="world,sd15")
    p.add_argument("--algos", default="lora,lokr,loha")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per training")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (graph capture happens here)")
    p.add_argument("--batch", type=int, default=0, help="batch size (0 = world 16, sd15 8)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--tol", type=float, default=1e-3, help="largest relative L2 of the whole adapter, eager vs graph")
    p.add_argument("--eager-twice", action="store_true", help="a second eager run: run-to-run noise reference")
    p.add_argument("--no-autocast", action="store_true",
                   help="[train] autocast = false: the bf16 model without autocast (the fp32 adapter cast to bf16)")
    p.add_argument("--profile", type=int, default=0,
                   help="profile this many optimizer steps after the timed ones (torch.profiler: kernels, CPU ops, "
                        "GPU busy fraction) into each variant's record and <out>/profile.txt")
    p.add_argument("--conv-layout", default="auto", choices=("auto", "false"),
                   help="[train] conv_weights_channels_last (session 37: auto = the frozen k×k conv weights "
                        "channels-last where they outsize their input, on a GPU)")
    p.add_argument("--deadline", type=float, default=None, help="unix time after which no new row starts")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, tiny models, batch 2, 1+2 steps, eager only (+ eager twice for the first row)")
    a = p.parse_args(argv)
    if a.smoke:
        a.device, a.steps, a.warmup, a.batch, a.eager_twice = "cpu", 2, 1, a.batch or 2, True
        torch.set_num_threads(1)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models, algos = [m for m in a.models.split(",") if m], [x for x in a.algos.split(",") if x]
    bad = [m for m in models if m not in BATCH] + [x for x in algos if x not in ALGOS]
    if bad:
        p.error(f"unknown model/algo {bad}: models are {list(BATCH)}, algos {list(ALGOS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import logging
    logging.getLogger("lyco.train").setLevel(logging.WARNING)
    with contextlib.suppress(Exception):  # the per-run "modules that should be kept in float32" notices
        import diffusers
        diffusers.utils.logging.set_verbosity_error()
    meta = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU ({platform.machine()})",
            "torch": torch.__version__, "python": platform.python_version(), "commit": _commit(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "settings": {"models": models, "algos": algos, "steps": a.steps, "warmup": a.warmup, "lr": a.lr,
                         "batch": {m: a.batch or BATCH[m] for m in models}, "tol": a.tol, "smoke": a.smoke,
                         "device": a.device, "eager_twice": a.eager_twice, "autocast": not a.no_autocast,
                         "conv_layout": a.conv_layout}}
    rows: list[dict] = []
    failed, longest = False, 0.0
    print(f"train_graph: {meta['device']}, torch {meta['torch']}, {models} x {algos}", flush=True)
    with tempfile.TemporaryDirectory(prefix="train_graph_") as tmp:
        for model in models:
            if meta.get("stopped"):
                break
            ctx = {"work": Path(tmp) / model}
            batch = a.batch or BATCH[model]
            ctx["train_dir"], ctx["res"] = make_data(model, ctx["work"] / "data", batch, a.warmup + a.steps, a.smoke)
            ctx["template"] = world_template() if model == "world" else None
            for algo in algos:
                left = None if a.deadline is None else a.deadline - time.time()
                if left is not None and left < 1.2 * longest + 5:
                    meta["stopped"] = f"deadline: {left:.0f}s left before {model}/{algo} (a row took {longest:.0f}s)"
                    print(meta["stopped"], flush=True)
                    break
                t_row = time.perf_counter()
                row = {"model": model, "algo": algo, "status": "running"}
                rows.append(row)
                twice = a.eager_twice and not (a.smoke and len(rows) > 1)  # smoke: the comparison code once
                for variant in ("eager", "graph") + (("eager2",) if twice else ()):
                    try:
                        row[variant] = run_variant(model, algo, variant, ctx, a)
                    except Exception as e:  # noqa: BLE001 — recorded, the next variant/row still runs
                        traceback.print_exc()
                        row[variant] = {"error": f"{type(e).__name__}: {e}"}
                    v = row[variant]
                    print(f"  {model}/{algo} {variant}: " + (json.dumps(v) if "ms_per_step" not in v else
                          f"{v['ms_per_step']:.1f} ms/step (median {v['median_ms']:.1f}), peak "
                          f"{_fmt(v['peak_gib'], '.2f')} GiB (at start {_fmt(v['start_gib'], '.2f')}), {v['wall_s']:.0f}s wall, graph {v['graph']}"),
                          flush=True)
                    write_results(out, meta, rows)
                e, g, e2 = row.get("eager", {}), row.get("graph", {}), row.get("eager2")
                if "ms_per_step" in e and "ms_per_step" in g:
                    row["speedup"] = e["ms_per_step"] / g["ms_per_step"]
                    row["cmp"] = compare(e["adapter"], g["adapter"])
                if e2 and "ms_per_step" in e and "ms_per_step" in e2:
                    row["noise"] = compare(e["adapter"], e2["adapter"])
                why = [f"{v} raised" for v in ("eager", "graph", "eager2") if "error" in (row.get(v) or {})]
                # Criterion: the whole adapter (rel L2 over all tensors). Per-tensor numbers are reported but
                # do not decide: LoRA-style "up" factors start at 0 and after a few Adam steps (each moving every
                # element by ~lr whatever its gradient) a single tensor's relative difference is dominated by the
                # run-to-run noise of non-deterministic GPU backward kernels (H200 run 1: eager vs graph worst
                # tensor 4.6e-2 while the file agreed to 1.3e-4; the tiny world model, deterministic, 0.0).
                # With --eager-twice the same numbers between two eager runs are the noise reference.
                c = row.get("cmp")
                # not "> tol": a NaN anywhere makes the rel L2 NaN, which no comparison exceeds (run 272's row with a
                # NaN ∂D in the text encoder's adapter passed as "ok")
                if c and ("error" in c or not c["rel_l2_file"] <= a.tol):
                    why.append("adapter rel L2 > tol or not finite")
                gs = g.get("graph") if "ms_per_step" in g else {"replays": 1}  # a graph run must have replayed
                if not gs or not gs.get("replays") or gs.get("disabled_reason"):
                    why.append(f"graph run did not replay graphs ({gs})")
                row["status"] = "FAIL: " + "; ".join(why) if why else "ok" if "cmp" in row else "eager only"
                failed |= bool(why)
                for name in ("cmp", "noise"):
                    c = row.get(name)
                    if c and "error" not in c:
                        worst = sorted(c["tensors"].items(), key=lambda kv: -kv[1][1])[:3]
                        print(f"  {model}/{algo} {'eager vs graph' if name == 'cmp' else 'eager vs eager'}: "
                              f"{len(c['tensors'])} tensors, max abs {c['max_abs']:.3e}, worst rel L2 {c['rel_l2']:.3e}, "
                              f"file rel L2 {c['rel_l2_file']:.3e}; worst: "
                              + "; ".join(f"{k} {v[0]:.2e}/{v[1]:.2e}" for k, v in worst), flush=True)
                    elif c:
                        print(f"  {model}/{algo} {name}: {c['error']}", flush=True)
                for v in ("eager", "graph", "eager2"):  # temp paths mean nothing once the folder is gone
                    if isinstance(row.get(v), dict):
                        row[v].pop("adapter", None)
                longest = max(longest, time.perf_counter() - t_row)
                print(f"{model}/{algo}: {row['status']} ({time.perf_counter() - t_row:.0f}s)", flush=True)
                write_results(out, meta, rows)
            del ctx
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_results(out, meta, rows)
    print((out / "train_graph.md").read_text(encoding="utf-8"))
    if failed:
        print("train_graph: FAILED (see the status column); results written to", out, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Training-step benchmark: lyco vs LyCORIS 4.1 (eager and Triton kernels) vs PEFT, on the real
SD1.5 and SDXL UNets (random weights, bf16, one GPU).

Per configuration it measures one training step (forward + backward + AdamW step on the trainable
parameters only): the median of ``--steps`` steps after ``--warmup`` steps, timed with CUDA events,
and the peak memory (``torch.cuda.max_memory_allocated``, reset per configuration, so it includes
the base model, the adapter, its gradients and optimizer state, and the activations; and torch's cuBLAS
workspaces of the configuration's own streams and threads: ``fresh_memory`` frees the earlier ones first).

Layer sets (identical for every library, passed to each as exact module names):
  * ``lin``      every ``nn.Linear`` and 1×1 ``nn.Conv2d`` inside a ``Transformer2DModel``
                 (attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2, proj_in, proj_out):
                 kohya's "attn-mlp" LoRA set; SD1.5: 192 layers, SDXL: 722 layers.
  * ``lin+conv`` ``lin`` plus every k×k ``nn.Conv2d`` inside ``ResnetBlock2D``/``Downsample2D``/
                 ``Upsample2D`` (resnet conv1/conv2, down/up-sampler convs) at the conv rank.
Baselines: ``floor`` (frozen base, no adapter, backward to the input latents), ``floor-geglu`` (the floor with
every ``ff.net.2`` running its GEGLU's backward as lyco's adapted layers do since change 120, in the graph column:
:func:`fuse_frozen_geglu`; not run unless named) and ``fullft`` (every UNet parameter trained with AdamW).

Run ``python benchmarks/train_step.py --help``; ``--smoke`` runs everything on the CPU with the tiny
models of ``lyco.models.tiny`` (no GPU needed). Results go to ``--out`` (default ``$OUT`` or ``.``)
as ``train_step<tag>.json`` and ``train_step<tag>.md`` (rewritten after every configuration).

Trusting the numbers on a noisy, launch-bound host: every configuration reports the median, p10
and p90 of its timed steps and ``host_ms`` (CPU time to issue one step: ≈ the step time means the
GPU waits for Python); ``--rounds N`` interleaves N passes over all configurations and pools
them; ``--graph`` also captures each whole step (forward, backward, capturable fused AdamW) as one
CUDA graph and times its replays — the device time without launch overhead, the same treatment for
every library (a library that synchronises with the host inside the step fails capture, recorded);
``--profile algo/variant,…`` writes ``profile<tag>.{json,txt}``: top kernels by self device time
per step, kernels per step, summed kernel time vs wall (GPU busy fraction) and the top CPU ops;
``--graph --graph-trace algo/variant,…`` writes one more replay's kernels per configuration
(``graph_trace_<model>_b<batch>_<algo>_<variant>.json``; ``benchmarks/graph_trace.py`` splits the span into
idle time and each kernel's exposed time, and subtracts two such traces);
``--graph --memory-peak algo/variant,…`` records the allocator's history over the graph phase and writes what is
live at its peak by allocation site (``memory_peak_*.json``, ``benchmarks/memory_peak.py``);
``--compile`` compiles the UNet for every configuration alike (floor, full fine-tune, lyco, peers).
Before timing, lyco's layers are checked on the device against fp32 merged-weight math: outputs
(``full_err``) and gradients of x and of every adapter tensor (``grad_err``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE.parent / "src") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "src"))

from _common import (  # noqa: E402  (benchmarks/)
    format_maker, format_profile, kernel_makers, machine_info, summarize_profile,
)

# ------------------------------------------------------------------------------------------------
# What is measured
# ------------------------------------------------------------------------------------------------

MODELS = {
    # name: lyco family, latent side, default batches (first = most important)
    "sd15": dict(family="sd1", latent=64, batches=(8, 1), res=512),
    "sdxl": dict(family="sdxl", latent=128, batches=(4, 1), res=1024),
}
SMOKE_LATENT = 8

#: per algorithm: layer set, lyco kwargs, LyCORIS kwargs, PEFT (tuner, kwargs) or None.
#: ``conv`` in a PEFT entry gives the rank/alpha used on the k×k convs (rank_pattern/alpha_pattern).
ALGOS: dict[str, dict[str, Any]] = {
    "lora": dict(layers="lin",
                 lyco=dict(algo="lora", rank=16, alpha=16),
                 lycoris=dict(algo="lora", linear_dim=16, linear_alpha=16),
                 peft=("lora", dict(r=16, lora_alpha=16))),
    "locon": dict(layers="lin+conv",
                  lyco=dict(algo="lora", rank=16, alpha=16, conv_rank=8, conv_alpha=8),
                  lycoris=dict(algo="locon", linear_dim=16, linear_alpha=16, conv_dim=8, conv_alpha=8),
                  peft=("lora", dict(r=16, lora_alpha=16, conv=(8, 8)))),
    "loha": dict(layers="lin+conv",
                 lyco=dict(algo="loha", rank=8, alpha=8, conv_rank=4, conv_alpha=4),
                 lycoris=dict(algo="loha", linear_dim=8, linear_alpha=8, conv_dim=4, conv_alpha=4),
                 peft=("loha", dict(r=8, alpha=8, conv=(4, 4)))),
    "lokr": dict(layers="lin+conv",
                 lyco=dict(algo="lokr", rank=16, alpha=16, conv_rank=16, conv_alpha=16, factor=8),
                 lycoris=dict(algo="lokr", linear_dim=16, linear_alpha=16, conv_dim=16, conv_alpha=16, factor=8),
                 peft=("lokr", dict(r=16, alpha=16, decompose_factor=8))),
    "lokr-full": dict(layers="lin+conv",
                      lyco=dict(algo="lokr", rank=16, alpha=16, conv_rank=16, conv_alpha=16, factor=8,
                                full_matrix=True),
                      lycoris=dict(algo="lokr", linear_dim=16, linear_alpha=16, conv_dim=16, conv_alpha=16,
                                   factor=8, full_matrix=True),
                      # PEFT has no full_matrix flag: a rank above every max(out_k, in_n)/2 gives full W2
                      peft=("lokr", dict(r=4096, alpha=4096, decompose_factor=8))),
    "dora": dict(layers="lin",
                 lyco=dict(algo="lora", rank=16, alpha=16, dora=True),
                 lycoris=dict(algo="lora", linear_dim=16, linear_alpha=16, dora_wd=True),
                 peft=("lora", dict(r=16, lora_alpha=16, use_dora=True))),
    "oft": dict(layers="lin",
                lyco=dict(algo="diag-oft", rank=16),
                lycoris=dict(algo="diag-oft", linear_dim=16, linear_alpha=0),
                # PEFT's OFT rotates the input features in blocks of 16 (ours/LyCORIS: output features)
                peft=("oft", dict(r=0, oft_block_size=16))),
    "glora": dict(layers="lin",
                  lyco=dict(algo="glora", rank=8, alpha=8),
                  lycoris=dict(algo="glora", linear_dim=8, linear_alpha=8),
                  peft=None),
    "ia3": dict(layers="lin",
                lyco=dict(algo="ia3"),
                lycoris=dict(algo="ia3", linear_dim=1, linear_alpha=1),
                peft=("ia3", dict(feedforward_modules=[]))),
    "full": dict(layers="lin",
                 lyco=dict(algo="full"),
                 lycoris=dict(algo="full", linear_dim=1, linear_alpha=1),
                 peft=None),
    "boft": dict(layers="lin",
                 lyco=dict(algo="boft", rank=16),
                 lycoris=dict(algo="boft", linear_dim=16, linear_alpha=0),
                 peft=("boft", dict(boft_block_size=8, boft_n_butterfly_factor=2))),
}

#: library variants, in the order they run for each algorithm
VARIANTS = {
    "lyco": dict(lib="lyco", mode="auto"),
    "lyco-rebuild": dict(lib="lyco", mode="rebuild"),
    # the delta path f(x) + m·Δy on every layer (where mode = "auto" rebuilds: DoRA, Full, (IA)³ input)
    "lyco-bypass": dict(lib="lyco", mode="bypass"),
    # DoRA with the weight norm treated as a constant in backward (DoRA paper §4.3; PEFT's default)
    "lyco-dora-detach": dict(lib="lyco", mode="auto", layer_opts={"dora_detach_norm": True}, only=("dora",)),
    # LoKr's delta path with the per-layer form forced (default: chosen from the shapes, see lokr.py)
    "lyco-lokr-structured": dict(lib="lyco", mode="bypass", lokr_path="structured", only=("lokr", "lokr-full")),
    "lyco-lokr-dense": dict(lib="lyco", mode="bypass", lokr_path="dense", only=("lokr", "lokr-full")),
    "lycoris-triton": dict(lib="lycoris", backend="triton", bypass=False),
    "lycoris-triton-bypass": dict(lib="lycoris", backend="triton", bypass=True),
    "peft": dict(lib="peft"),
    "lycoris-eager": dict(lib="lycoris", backend="torch", bypass=False),
    "lycoris-eager-bypass": dict(lib="lycoris", backend="torch", bypass=True),
}
DEFAULT_VARIANTS = "lyco,peft,lycoris-eager,lycoris-triton,lycoris-triton-bypass"
#: run after every algorithm's main comparisons (the budget cuts these first). LyCORIS's Triton
#: variants are here: on an H200 (SD1.5 b8) each took 30–65 s to warm up (JIT + kernel tuning)
#: and ran slower than LyCORIS eager.
SECONDARY_VARIANTS = ("lycoris-triton", "lycoris-triton-bypass", "lycoris-eager-bypass")

GiB = 1024 ** 3
#: the baselines ``--baselines`` may name, in the order they run
BASELINES = ("floor", "floor-geglu", "fullft")


def log(*a):
    print(*a, flush=True)


def quiet_libraries():
    from lyco._quiet import quiet_libraries as quiet
    quiet(loggers=("LyCORIS", "lycoris", "peft"), messages=(".*oft_block_size.*",))
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


#: variants whose result is not the algorithm named (excluded from "best peer")
NOT_THE_ALGORITHM = {
    ("dora", "lycoris-triton-bypass"): "LyCORIS bypass_mode ignores dora_wd (runs plain LoRA)",
    ("dora", "lycoris-eager-bypass"): "LyCORIS bypass_mode ignores dora_wd (runs plain LoRA)",
}

#: configurations a library refuses by design: listed as "n/a", not run
UNSUPPORTED = {
    ("full", "lycoris-triton-bypass"): "LyCORIS: bypass mode is not supported in Full algo",
    ("full", "lycoris-eager-bypass"): "LyCORIS: bypass mode is not supported in Full algo",
}

#: smoke runs (tiny UNets, widths 8–32): ranks that are valid there
SMOKE_OVERRIDES = {"glora": dict(lyco=dict(rank=4, alpha=4), lycoris=dict(linear_dim=4, linear_alpha=4))}


# ------------------------------------------------------------------------------------------------
# Models, inputs, layer sets
# ------------------------------------------------------------------------------------------------


def build_unet(model: str, smoke: bool, device, dtype):
    from lyco.models import configs
    fam = MODELS[model]["family"]
    if smoke:
        from lyco.models import tiny
        cfg = tiny.tiny_configs(fam)["unet"]
        unet = configs.build_from_config(cfg, device="cpu")
        tiny.randomize_(unet, 0)
        unet = unet.to(device=device, dtype=dtype)
    else:
        unet = configs.build_unet(fam, device=device, dtype=dtype)
    unet.requires_grad_(False)
    return unet.train()


def frozen_weights_cl(unet, mode: str, batch: int, latent: int, device, dtype) -> int:
    """Session 37's experiment: the frozen k×k convs' weights stored channels-last (``mode`` "all"), or only where
    the weight has at least as many elements as the conv's input at this batch ("rule") — cuDNN's bf16 convs run
    NHWC and convert an NCHW weight on every call (run 260's floor at SD1.5 b1: 6.21 of 19.71 ms busy in
    ``nchwToNhwcKernel``, mostly the 16×16 and 8×8 levels' 1280-wide weights); a channels-last weight makes torch
    pick channels-last for the call, so the (smaller) input is converted instead. Returns the convs converted."""
    if mode == "off":
        return 0
    if mode == "model":  # what diffusers' docs suggest for speed: every 4-D parameter channels-last
        unet.to(memory_format=torch.channels_last)
        return sum(1 for m in unet.modules() if isinstance(m, nn.Conv2d))
    if mode == "rule":  # what lyco train does ([train] conv_weights_channels_last): decided in a forward at this batch
        from lyco.models import layout
        lay = layout.frozen_conv_weights_channels_last(unet)
        inp, _ = make_inputs(unet, batch, latent, device, dtype)
        with torch.no_grad():
            unet(**inp)
        lay.remove()
        return len(lay.converted)
    from lyco.models import layout
    done = 0
    for m in unet.modules():
        if isinstance(m, nn.Conv2d) and layout._kxk(m.weight):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
            done += 1
    return done


def make_inputs(unet, batch: int, latent: int, device, dtype, seed: int = 0):
    cfg = unet.config
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    cross = cfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    inp = {
        "sample": rnd(batch, cfg.in_channels, latent, latent),
        "timestep": torch.randint(0, 1000, (batch,), generator=g).to(device),
        "encoder_hidden_states": rnd(batch, 77, cross),
    }
    if cfg.get("addition_embed_type") == "text_time":
        n_time = 6
        text_dim = cfg.projection_class_embeddings_input_dim - n_time * cfg.addition_time_embed_dim
        inp["added_cond_kwargs"] = {"text_embeds": rnd(batch, text_dim),
                                    "time_ids": rnd(batch, n_time).abs() * 512}
    target = rnd(batch, cfg.out_channels, latent, latent)
    return inp, target


def layer_input_shapes(unet, names, batch: int, latent: int, device, dtype) -> dict:
    """The input shape of each layer in ``names`` (module names of ``unet``) in one no-grad forward at this
    batch and latent size (forward pre-hooks, removed after)."""
    mods = dict(unet.named_modules())
    shapes = {}

    def record(name):
        def hook(module, args):
            shapes.setdefault(name, args[0].shape)  # returns None: the arguments stay as they are
        return hook
    hooks = [mods[n].register_forward_pre_hook(record(n)) for n in names]
    inp, _ = make_inputs(unet, batch, latent, device, dtype)
    try:
        with torch.no_grad():
            unet(**inp)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def layer_sets(unet) -> dict[str, list[str]]:
    """Exact module names of the ``lin`` and ``conv`` sets (see the module doc)."""
    lin, conv = [], []
    seen = set()
    for bname, block in unet.named_modules():
        cls = type(block).__name__
        if cls == "Transformer2DModel":
            for n, m in block.named_modules():
                full = f"{bname}.{n}"
                if full in seen:
                    continue
                if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)):
                    lin.append(full)
                    seen.add(full)
        elif cls in ("ResnetBlock2D", "Downsample2D", "Upsample2D"):
            for n, m in block.named_modules():
                full = f"{bname}.{n}"
                if full in seen:
                    continue
                if isinstance(m, nn.Conv2d) and any(k != 1 for k in m.kernel_size):
                    conv.append(full)
                    seen.add(full)
    return {"lin": lin, "conv": conv, "lin+conv": lin + conv}


def count(params) -> int:
    return int(sum(p.numel() for p in params))


# ------------------------------------------------------------------------------------------------
# Randomising adapters (never time or check on zeros)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def randomise_(params, seed: int, scale: float):
    """p += scale · N(0, 1/fan_in) for matrices (fan_in = numel/shape[0]), scale · N(0, 0.1²) for
    vectors and scalars: every adapter (zero-initialised halves included) becomes non-zero, with a
    per-layer effect of roughly ``scale`` relative to the base output."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for p in params:
        if not p.is_floating_point():
            continue
        if p.dim() >= 2:
            std = 1.0 / math.sqrt(max(1, p.numel() // max(1, p.shape[0])))
        else:
            std = 0.1
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * (scale * std)
        p.add_(noise.to(device=p.device, dtype=p.dtype))


# ------------------------------------------------------------------------------------------------
# Libraries: attach → Handle(params, detach)
# ------------------------------------------------------------------------------------------------


@dataclass
class Handle:
    params: list
    detach: Callable[[], None]
    info: dict = field(default_factory=dict)
    lyco_net: Any = None


def _name_regex(names) -> str:
    return "re:(?:" + "|".join(re.escape(n) for n in names) + ")"


def attach_lyco(unet, algo: str, names: dict, mode: str, adapter_dtype, layer_opts=None, lokr_path=None,
                alpha_scale: float = 1.0) -> Handle:
    import lyco
    from lyco.algorithms import lokr as lokr_mod
    lokr_mod.FORCE_PATH = lokr_path
    spec = dict(ALGOS[algo]["lyco"])
    for k in ("alpha", "conv_alpha"):  # --alpha-scale: the configurations users train (alpha ≠ rank: γ ≠ 1)
        if k in spec and alpha_scale != 1.0:
            spec[k] = spec[k] * alpha_scale
    layer_names = names[ALGOS[algo]["layers"]]
    preset = {"name": "bench", "include_conv": True, "unet": {"target_names": [_name_regex(layer_names)]}}
    a = spec.pop("algo")
    net = lyco.create({"unet": unet}, algo=a, preset=preset, dtype=adapter_dtype, mode=mode, **spec)
    assert len(net.layers) == len(layer_names), (len(net.layers), len(layer_names))
    for layer in net.layers.values():
        layer.opts.update(layer_opts or {})

    def detach():
        net.detach()
        lokr_mod.FORCE_PATH = None

    info = {"layers": len(net.layers)}
    if layer_opts:
        info["layer_opts"] = dict(layer_opts)
    if lokr_path:
        info["lokr_path"] = lokr_path
    if alpha_scale != 1.0:
        info["alpha_scale"] = alpha_scale
    return Handle(net.trainable_parameters(), detach, info, lyco_net=net)


_LYCORIS_PRESET_DIR = None


def attach_lycoris(unet, algo: str, names: dict, backend: str, bypass: bool, adapter_dtype, smoke: bool) -> Handle:
    global _LYCORIS_PRESET_DIR
    import logging
    import lycoris
    from lycoris import wrapper as lw
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)  # set to INFO when lycoris is imported
    if backend == "triton" and not torch.cuda.is_available():
        backend = "auto"  # smoke run on the CPU: no Triton; exercise the code path anyway
    os.environ["LYCORIS_KERNEL_BACKEND"] = backend
    layer_names = names[ALGOS[algo]["layers"]]
    if _LYCORIS_PRESET_DIR is None:
        _LYCORIS_PRESET_DIR = tempfile.mkdtemp(prefix="lycoris_preset_")
    import hashlib
    digest = hashlib.sha1("\n".join(layer_names).encode()).hexdigest()[:12]  # per model and layer set
    path = Path(_LYCORIS_PRESET_DIR) / f"{ALGOS[algo]['layers'].replace('+', '_')}_{digest}.toml"
    if not path.exists():
        # exact, anchored names (LyCORIS uses re.match, which is only prefix-anchored)
        pats = [re.escape(n) + "$" for n in layer_names]
        body = "enable_conv = true\nuse_fnmatch = false\ntarget_module = []\ntarget_name = [\n"
        body += "".join(f"  '{p}',\n" for p in pats) + "]\n"
        path.write_text(body)
    # class-level state of LycorisNetwork survives between calls: reset what our preset does not set
    lw.LycorisNetwork.MODULE_ALGO_MAP = {}
    lw.LycorisNetwork.NAME_ALGO_MAP = {}
    lw.LycorisNetwork.TARGET_EXCLUDE_NAME = []
    kw = dict(ALGOS[algo]["lycoris"])
    dim, alpha = kw.pop("linear_dim"), kw.pop("linear_alpha")
    net = lycoris.create_lycoris(unet, 1.0, linear_dim=dim, linear_alpha=alpha, preset=str(path),
                                 bypass_mode=bypass, warn_on_unmatched=False, **kw)
    net.apply_to()
    dev = next(unet.parameters()).device
    net.to(device=dev, dtype=adapter_dtype)
    n = len(net.loras)
    if n != len(layer_names):
        net.restore()
        raise RuntimeError(f"LyCORIS wrapped {n} layers, expected {len(layer_names)}")
    params = [p for p in net.parameters() if p.requires_grad]

    def detach():
        net.restore()
        for lora in net.loras:
            lora.org_module = [None]

    return Handle(params, detach, {"layers": n, "backend": backend, "bypass_mode": bypass})


def attach_peft(unet, algo: str, names: dict, adapter_dtype) -> Handle:
    import peft
    entry = ALGOS[algo]["peft"]
    if entry is None:
        raise NotImplementedError(f"PEFT has no {algo}")
    kind, kw = entry
    kw = dict(kw)
    layer_names = names[ALGOS[algo]["layers"]]
    conv = kw.pop("conv", None)
    if conv is not None:
        convs = names["conv"]
        rk, ak = ("rank_pattern", "alpha_pattern")
        kw[rk] = {re.escape(n): conv[0] for n in convs}
        kw[ak] = {re.escape(n): conv[1] for n in convs}
    cfg_cls, model_cls = {
        "lora": (peft.LoraConfig, peft.LoraModel), "loha": (peft.LoHaConfig, peft.LoHaModel),
        "lokr": (peft.LoKrConfig, peft.LoKrModel), "oft": (peft.OFTConfig, peft.OFTModel),
        "boft": (peft.BOFTConfig, peft.BOFTModel), "ia3": (peft.IA3Config, peft.IA3Model),
    }[kind]
    cfg = cfg_cls(target_modules=list(layer_names), **kw)
    # the tuner directly (no PeftModel wrapper, no autocast of adapter weights to fp32)
    tuner = model_cls(unet, cfg, "default")
    params = [p for n, p in unet.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            if p.is_floating_point() and p.dtype != adapter_dtype:
                p.data = p.data.to(adapter_dtype)

    def detach():
        tuner.unload()

    return Handle(params, detach, {"layers": len(layer_names), "peft": peft.__version__})


def snapshot_modules(unet, names) -> dict:
    """The target modules and their weight/bias Parameter objects, to restore after each config."""
    out = {}
    for n in names:
        mod = unet.get_submodule(n)
        out[n] = (mod, mod._parameters.get("weight"), mod._parameters.get("bias"))
    return out


def sanitize(unet, originals: dict):
    """Put back any module, patched forward or parameter a config left behind. (LyCORIS's Full
    ``restore()`` re-creates the base weight as a new *CPU* Parameter; a failed attach can leave a
    half-wrapped module.)"""
    fixed = 0
    for name, (mod, w, b) in originals.items():
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        if getattr(parent, child) is not mod:
            setattr(parent, child, mod)
            fixed += 1
        for attr in ("forward", "_lyco_host", "_lycoris_wrappers", "_lycoris_original_forward"):
            if attr in mod.__dict__:
                del mod.__dict__[attr]
                fixed += 1
        for pname, p in (("weight", w), ("bias", b)):
            if mod._parameters.get(pname) is not p:
                mod._parameters[pname] = p
                mod.__dict__.pop(pname, None)
                fixed += 1
    unet.requires_grad_(False)
    for p in unet.parameters():
        p.grad = None
    return fixed


# ------------------------------------------------------------------------------------------------
# Correctness checks
# ------------------------------------------------------------------------------------------------


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@torch.no_grad()
def check_lyco_layers(net, dtype, seed: int = 0) -> dict:
    """One layer per distinct (algorithm, kind, weight shape): the patched forward (bypass, ``dtype``)
    against the merged weight computed in fp32 (``op(x, W + m·ΔW)``)."""
    from lyco.algorithms.base import layer_op
    g = torch.Generator(device="cpu").manual_seed(seed)
    seen = set()
    worst = {"full_err": 0.0, "delta_err": 0.0, "min_effect": float("inf"), "layers_checked": 0, "finite": True}
    for key, layer in net.layers.items():
        spec = layer.spec
        sig = (repr(layer.algorithm), spec.kind, spec.weight_shape)
        if sig in seen:
            continue
        seen.add(sig)
        mod = net._targets[key]
        if spec.kind == "linear":
            x = torch.randn(2, 16, spec.in_dim, generator=g)
        else:
            x = torch.randn(2, spec.in_dim * spec.groups, 8, 8, generator=g)
        dev = mod.weight.device
        x = x.to(device=dev, dtype=dtype)
        y = mod(x)                                        # what training runs
        host = mod._lyco_host
        y0 = host._orig(x)                                # base layer alone, same dtype
        d = layer.delta_output(x, mod.weight, mod.bias, y0)  # the algorithm's bypass delta
        w32 = mod.weight.detach().float()
        b32 = mod.bias.detach().float() if mod.bias is not None else None
        w2, b2 = layer.merged_weight(w32, b32, layer.multiplier)
        ref = layer_op(x.float(), spec, w2, b2)
        ref0 = layer_op(x.float(), spec, w32, b32)
        worst["finite"] &= bool(torch.isfinite(y).all())
        worst["full_err"] = max(worst["full_err"], _rel(y, ref))
        worst["delta_err"] = max(worst["delta_err"], _rel(d, ref - ref0))
        worst["min_effect"] = min(worst["min_effect"], float((ref - ref0).norm() / ref.norm()))
        worst["layers_checked"] += 1
    return worst


def check_lyco_grads(net, dtype, seed: int = 0) -> dict:
    """Gradients too, one layer per distinct shape: ∂/∂(adapter tensors, x) of ⟨r, layer(x)⟩ on the
    training path (``dtype``) against the same through ``op(x, W + m·ΔW)`` in fp32 (autograd
    through the merged weight). Skipped for layers whose training gradient is *defined* differently
    (DoRA with a detached norm)."""
    from lyco.algorithms.base import layer_op
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    seen = set()
    worst = {"grad_err": 0.0, "grad_layers": 0}
    for key, layer in net.layers.items():
        spec = layer.spec
        sig = (repr(layer.algorithm), spec.kind, spec.weight_shape)
        if sig in seen or layer.opts.get("dora_detach_norm"):
            continue
        seen.add(sig)
        mod = net._targets[key]
        shape = (2, 16, spec.in_dim) if spec.kind == "linear" else (2, spec.in_dim * spec.groups, 8, 8)
        dev = mod.weight.device
        x = torch.randn(*shape, generator=g).to(device=dev, dtype=dtype)
        params = list(layer.params.values())
        grads = []
        for ref in (False, True):
            xx = x.clone().requires_grad_(True)
            if ref:
                w32 = mod.weight.detach().float()
                b32 = mod.bias.detach().float() if mod.bias is not None else None
                y = layer_op(xx.float(), spec, *layer.merged_weight(w32, b32, layer.multiplier))
            else:
                y = mod(xx)
            if not ref:
                r = torch.randn(y.shape, generator=g).to(device=dev)
            (y.float() * r).sum().backward()
            grads.append([xx.grad] + [p.grad for p in params])
            for p in params:
                p.grad = None
        for a, b in zip(*grads):
            if a is not None and b is not None:
                worst["grad_err"] = max(worst["grad_err"], _rel(a, b))
        worst["grad_layers"] += 1
    return worst


@torch.no_grad()
def model_effect(unet, inputs1, base_out) -> dict:
    out = unet(**inputs1, return_dict=False)[0]
    return {"effect": _rel(out, base_out), "finite": bool(torch.isfinite(out).all())}


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


class Timer:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks = []

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, s):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append((s, e))
        else:
            self.marks.append((s, time.perf_counter()))

    def times_ms(self):
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in self.marks]
        return [(e - s) * 1e3 for s, e in self.marks]


def ceilings(device) -> dict:
    """METHOD.md's two ceilings, measured once: a large device-to-device copy (bytes read + written)
    and a large bf16 matrix product."""
    out = {}
    try:
        n = 1 << 29  # 1 GiB of bf16
        a = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        out["copy_GBps"] = 10 * 2 * a.numel() * a.element_size() / (s.elapsed_time(e) / 1e3) / 1e9
        del a, b
        m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            m @ m
        torch.cuda.synchronize()
        s.record()
        for _ in range(10):
            m @ m
        e.record()
        torch.cuda.synchronize()
        out["bf16_matmul_TFLOPs"] = 10 * 2 * 8192 ** 3 / (s.elapsed_time(e) / 1e3) / 1e12
        del m
        torch.cuda.empty_cache()
    except Exception as ex:  # noqa: BLE001
        out["error"] = str(ex)
    return out


def sync(cuda):
    if cuda:
        torch.cuda.synchronize()


def _stats(ts: list[float], prefix: str = "") -> dict:
    ts_sorted = sorted(ts)
    q = lambda f: ts_sorted[min(len(ts) - 1, int(f * (len(ts) - 1) + 0.5))]
    return {f"{prefix}median_ms": statistics.median(ts), f"{prefix}p10_ms": q(0.1), f"{prefix}p90_ms": q(0.9),
            f"{prefix}min_ms": ts_sorted[0]}


def run_steps(step, warmup: int, steps: int, cuda: bool):
    """Median/p10/p90 of ``steps`` timed steps (CUDA events) after ``warmup``; ``host_ms``: the
    median CPU time to *issue* one step (return of ``step()``, no sync). When ``host_ms`` is close
    to the step time the step is launch-bound (the GPU waits for the CPU)."""
    t_first = time.perf_counter()
    step()
    sync(cuda)
    first_ms = (time.perf_counter() - t_first) * 1e3
    for _ in range(max(0, warmup - 1)):
        step()
    sync(cuda)
    tm = Timer(cuda)
    host = []
    for _ in range(steps):
        s = tm.start()
        h0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - h0) * 1e3)
        tm.stop(s)
    ts = tm.times_ms()
    return {**_stats(ts), "host_ms": statistics.median(host), "first_step_ms": first_ms, "steps": len(ts),
            "times_ms": [round(t, 3) for t in ts]}


_SIDE_STREAM = None


def bench_optimizer(params, lyco: bool, **kw):
    """AdamW for the step: torch's for the floor's ceiling and the peers; for lyco ``lyco.optim.FlatAdamW`` (one
    flat buffer per group, one update launch: the optimizer ``lyco train`` runs) unless ``LYCO_BENCH_OPTIM`` is set
    to anything but ``flat`` — the A/B switch of the run scripts (``aba`` sets it to 0)."""
    if not params:
        return None
    if lyco and os.environ.get("LYCO_BENCH_OPTIM", "flat") == "flat":
        from lyco.optim import FlatAdamW
        return FlatAdamW(params, **kw)
    return torch.optim.AdamW(params, **kw)


def _graph_makers(step, side, trace: Path) -> None:
    """One more warm-up step — the captured step's code paths (``graph_step``, on the capture's stream), run eagerly
    — under torch.profiler with shapes and stacks: which ops launch the kernels named by ``--graph-makers``
    (``_common.kernel_makers``; a captured step's trace names its kernels only) → ``<trace>.makers.txt``."""
    from torch.profiler import ProfilerActivity, profile

    from lyco.algorithms import graph_policy
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                 with_stack=True) as prof:
        with torch.cuda.stream(side), graph_policy.graph_step():
            step()
        torch.cuda.synchronize()
    rows = kernel_makers(prof, 1, list(_GRAPH_MAKERS[0]), top=_GRAPH_MAKERS_TOP[0])
    trace.with_suffix(".makers.txt").write_text("".join(format_maker(k) + "\n" for k in rows))


def run_graph(model_fn, inputs, target, params, floor: bool, steps: int, lyco: bool = False,
              trace: Path | None = None, mem: Path | None = None) -> dict:
    """The same training step captured once as a CUDA graph (forward, backward and a capturable
    fused AdamW), then replayed: the step's device time without any CPU launch overhead — the same
    treatment for every library. Fails (recorded, not fatal) where a library synchronises with the
    host inside the step. ``trace``: one more replay under torch.profiler, its kernels written there
    (``graph_trace.py``: the timeline's span split into idle and each kernel's exposed time). ``mem``: the
    allocator's history over the warm-up and the capture, its peak's live blocks by allocation
    site written there (``memory_peak.py``). Both the peak and the history start after the eager step that checks
    for host synchronisations."""
    try:
        return _run_graph(model_fn, inputs, target, params, floor, steps, lyco, trace, mem)
    finally:
        if mem is not None:  # stopped already where the capture succeeded; stopping twice is harmless
            torch.cuda.memory._record_memory_history(enabled=None)


#: ``--lyco-grad-sink``: lyco's graph step as its trainer's (``lyco.train.loop``'s ``_step_casts``): the forward and
#: backward inside ``casts.step_casts(grad_sink=True)``, the adapter's gradients kept between steps and zeroed in the
#: step, so that the ops add their factor gradients into them (and may leave their side streams unjoined,
#: ``lowrank._late_join``)
_GRAD_SINK = [False]

#: ``--graph-makers``: kernel-name substrings whose launching ops :func:`_graph_makers` lists for every traced config
_GRAPH_MAKERS: list = [()]
#: ``--graph-makers-top``: how many launching-op groups per kernel pattern (run 274's 25 named 297 of the layout
#: floor's 677 ``elementwise_kernel<128,4>`` launches)
_GRAPH_MAKERS_TOP: list = [25]


def _run_graph(model_fn, inputs, target, params, floor, steps, lyco, trace, mem) -> dict:
    from lyco.algorithms import casts, graph_policy
    opt = bench_optimizer(params, lyco, lr=1e-6, weight_decay=0.0, fused=True, capturable=True)
    sink = lyco and _GRAD_SINK[0] and opt is not None
    if sink:
        for p in params:
            p.grad = torch.zeros_like(p)

    def body():
        if sink:
            torch._foreach_zero_([p.grad for p in params])
        with casts.step_casts(grad_sink=True) if sink else contextlib.nullcontext():
            out = model_fn(**inputs, return_dict=False)[0]
            loss = F.mse_loss(out.float(), target.float())
            loss.backward()
        if opt is not None:
            opt.step()

    def clear():
        if opt is not None:
            opt.zero_grad(set_to_none=not sink)
        if floor:
            inputs["sample"].grad = None

    # a host synchronisation inside the step would fail the capture (and may leave the stream in
    # an error state): find it first, in an eager step with sync debugging set to raise
    clear()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        body()
    except RuntimeError as e:
        raise RuntimeError(f"host sync inside the step: {str(e).splitlines()[0][:200]}") from None
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    # the peak from here: the check step is eager (lyco's captured-steps paths off: a different step from the one
    # captured) and its peak counted in the graph column's until run 178, where lyco's captured step came in under it
    fresh_memory()
    if mem is not None:
        import memory_peak
        memory_peak.record_start()
    # one side stream for every config (capture included): each new stream gets its own cuBLAS
    # workspace from the caching allocator, kept by torch — ≈ 64 MiB more "allocated" per config (run 6;
    # fresh_memory frees them between measurements since session 24)
    global _SIDE_STREAM
    if _SIDE_STREAM is None:
        _SIDE_STREAM = torch.cuda.Stream()
    side = _SIDE_STREAM
    side.wait_stream(torch.cuda.current_stream())
    # lyco's kernels meant for captured steps (factor_triton: LoHa/LoKr builds) in the warm-up and capture, as
    # lyco's trainer runs them (lyco.train.graphs); the eager columns keep the eager default. graph_step also runs
    # the backward on this thread (LYCO_CALLER_BACKWARD) — for every variant alike, floor and peers included
    with torch.cuda.stream(side), graph_policy.graph_step():
        for _ in range(3):
            clear()
            body()
    if trace is not None and _GRAPH_MAKERS[0]:
        try:
            _graph_makers(lambda: (clear(), body()), side, trace)
        except Exception as e:  # noqa: BLE001 — the timing stands without it (torch's parse of a profile with
            # stacks can fail to decode an event's name: seen with torch 2.13 on the CPU)
            trace.with_suffix(".makers.txt").write_text(f"failed: {type(e).__name__}: {str(e)[:300]}\n")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    clear()
    # every variant's graph — the floor's and the peers' included — as lyco's trainer makes its own: the libraries'
    # memset nodes as kernel nodes where LYCO_GRAPH_MEMSETS=1 (lyco.train.graph_memsets, session 41; the default since run 298)
    from lyco.train import blas_carveout, graph_memsets
    g = graph_memsets.new_graph()
    try:
        # lyco's capture as its trainer's: LYCO_BLAS_CARVEOUT's SMs left to the side streams (off by default;
        # lyco.train.blas_carveout) — not the floor's or the peers' (no side streams of lyco's there)
        with (blas_carveout.during_capture() if lyco else contextlib.nullcontext()), \
                torch.cuda.graph(g, stream=side), graph_policy.graph_step():
            body()
        replaced = graph_memsets.finish(g)
        mem_rec = None
        if mem is not None:  # before the replays: they allocate nothing
            import memory_peak
            m = memory_peak.record_stop(mem)
            mem_rec = {"peak_mib": round(m["peak_mib"], 1), "sites": m["sites"][:6]}
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        tm = Timer(True)
        for _ in range(steps):
            s = tm.start()
            g.replay()
            tm.stop(s)
        ts = tm.times_ms()
        rec = {**_stats(ts, "graph_"), "graph_peak_gib": torch.cuda.max_memory_allocated() / GiB,
               "graph_memsets_replaced": replaced}
        if mem_rec is not None:
            rec["memory_peak"] = mem_rec
        if trace is not None:
            try:
                rec["graph_trace"] = trace_replay(g, trace)
            except Exception as e:  # noqa: BLE001 — the timing stands without it
                rec["graph_trace_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        return rec
    finally:
        del g
        clear()
        torch.cuda.synchronize()


def trace_replay(g, path: Path) -> dict:
    """One replay of ``g`` under torch.profiler (device activity only), its kernels written to ``path``
    (``graph_trace.from_chrome``'s form); returns the timeline's span, busy and idle µs and the kernel count. The
    profiler sees a graph's kernels only if it ran once before the process's first capture (``main`` does that)."""
    import graph_trace
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    tmp = path.with_name(path.stem + ".chrome.json")
    prof.export_chrome_trace(str(tmp))
    ks = graph_trace.from_chrome(tmp)
    tmp.unlink()
    path.write_text(json.dumps({"kernels": ks}))
    s = graph_trace.summary(ks)
    return {k: round(s[k], 1) for k in ("span", "busy", "idle", "sum")} | {"count": s["count"]}


def profile_step(step, cuda: bool, steps: int = 3, top: int = 15, makers: tuple = ()) -> dict:
    """torch.profiler over ``steps`` steps: the kernels that dominate (self device time per step),
    kernel count per step, summed kernel time vs wall time per step (busy fraction: ≪ 1 means
    the GPU idles, waiting for launches), and the top CPU-side ops (``_common.summarize_profile``)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()
    sync(cuda)
    with profile(activities=acts, record_shapes=bool(makers), with_stack=bool(makers)) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(cuda)
        wall = (time.perf_counter() - t0) * 1e3 / steps
    rec = summarize_profile(prof, steps, wall, cuda, top)
    if makers:
        rec["makers"] = kernel_makers(prof, steps, list(makers))
    return rec


def make_step(model_fn, inputs, target, params, floor: bool, cuda: bool, fused_ok: bool, lyco: bool = False):
    kw = {"fused": True} if (cuda and fused_ok) else {}
    opt = bench_optimizer(params, lyco, lr=1e-6, weight_decay=0.0, **kw)

    def step():
        out = model_fn(**inputs, return_dict=False)[0]
        loss = F.mse_loss(out.float(), target.float())
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if floor:
            inputs["sample"].grad = None

    return step, opt


# ------------------------------------------------------------------------------------------------
# One configuration
# ------------------------------------------------------------------------------------------------


def fresh_memory() -> None:
    """Start a memory measurement from what the configuration allocates itself. torch keeps one cuBLAS workspace
    per (thread's handle, stream) for the process's life (32 MiB on Hopper), so a configuration measured after
    another counted the earlier one's workspaces too: after lyco's captured step every peer's peak carried lyco's
    two side-stream workspaces, and lyco's eager peak the floor's captured-step ones (session 24; before it the
    tables compared peaks that held different sets). Freed here, after a synchronisation, with no CUDA graph left
    to replay; each measurement then holds the workspaces of its own streams and threads."""
    gc.collect()
    torch.cuda.synchronize()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


class _FrozenGegluLinear(torch.autograd.Function):
    """A frozen ``ff.net.2`` reading a GEGLU's ``a ⊙ gelu(g)``, given the projection's output p as its input: ``∂x =
    ∂y·W``, then the GEGLU's backward as lyco's captured LoRA step runs it (one Triton pass, no ∂D: change 120) —
    the floor with that kernel (``floor-geglu``)."""

    @staticmethod
    def forward(ctx, p, x, weight, bias):
        ctx.save_for_backward(p, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        from lyco.algorithms import regen_triton
        p, w = ctx.saved_tensors
        return regen_triton.geglu_input_grad(gy.reshape(-1, gy.shape[-1]) @ w, p), None, None, None


def fuse_frozen_geglu(unet):
    """The ``floor-geglu`` baseline: every ``ff.net.2`` of the frozen UNet takes its GEGLU's backward into its own
    (:class:`_FrozenGegluLinear`) where ``lyco.algorithms.regen.find_geglu`` finds the GEGLU — under its policy, so in
    the graph column (``graph_step``) only — as lyco's adapted ``ff.net.2`` does since change 120. lyco's LoRA step
    runs the frozen model's GEGLU backward in that one pass, where the floor runs torch's three nodes; against this
    baseline its ratio counts only the adapter's own work. Returns the function that restores the modules."""
    from lyco.algorithms import regen
    patched = []
    for name, m in unet.named_modules():
        if not (name.endswith("ff.net.2") and isinstance(m, torch.nn.Linear)):
            continue

        def fwd(x, m=m):
            p = regen.geglu_input(x) if torch.is_grad_enabled() else None
            if p is None:
                return F.linear(x, m.weight, m.bias)
            return _FrozenGegluLinear.apply(p, x.detach(), m.weight, m.bias)
        m.forward = fwd
        patched.append(m)

    def restore():
        for m in patched:
            m.__dict__.pop("forward", None)
    return restore


def run_config(ctx, algo: str | None, variant: str) -> dict:
    """Attach, randomise, check, time, detach. Every failure is caught and recorded."""
    a = ctx["args"]
    unet, cuda, dtype = ctx["unet"], ctx["cuda"], ctx["dtype"]
    rec = {"model": ctx["model"], "batch": ctx["batch"], "algo": algo or variant, "variant": variant,
           "status": "ok"}
    handle = None
    restore = None
    t0 = time.perf_counter()
    step_model = unet
    try:
        gc.collect()
        if cuda:
            fresh_memory()
            rec["base_alloc_gib"] = torch.cuda.memory_allocated() / GiB
        floor = variant in ("floor", "floor-geglu")
        params = []
        if floor:
            ctx["inputs"]["sample"].requires_grad_(True)
            if variant == "floor-geglu":
                restore = fuse_frozen_geglu(unet)
        elif variant == "fullft":
            unet.requires_grad_(True)
            params = [p for p in unet.parameters()]
        else:
            v = VARIANTS[variant]
            lib = v["lib"]
            if lib == "lyco":
                handle = attach_lyco(unet, algo, ctx["names"], v["mode"], ctx["adapter_dtype"],
                                     v.get("layer_opts"), v.get("lokr_path"), a.alpha_scale)
            elif lib == "lycoris":
                handle = attach_lycoris(unet, algo, ctx["names"], v["backend"], v["bypass"],
                                        ctx["adapter_dtype"], a.smoke)
            else:
                handle = attach_peft(unet, algo, ctx["names"], ctx["adapter_dtype"])
            rec.update(handle.info)
            if (algo, variant) in NOT_THE_ALGORITHM:
                rec["note"] = NOT_THE_ALGORITHM[(algo, variant)]
            params = handle.params
            if not params:
                raise RuntimeError("no trainable parameters")
            randomise_(params, seed=1, scale=a.init_scale)
            rec["attach_s"] = time.perf_counter() - t0
            if handle.lyco_net is not None:
                chk = check_lyco_layers(handle.lyco_net, dtype)
                chk.update(check_lyco_grads(handle.lyco_net, dtype))
                chk["ok"] = bool(chk["finite"] and chk["full_err"] <= 1e-2 and chk["grad_err"] <= 5e-2)
                rec["check"] = chk
            rec["model_check"] = model_effect(unet, ctx["inputs1"], ctx["base_out1"])
            if not (rec["model_check"]["effect"] > 0 and rec["model_check"]["finite"]):
                rec["model_check"]["ok"] = False
        rec["trainable_params"] = count(params)
        rec["trainable_dtype"] = str(params[0].dtype).replace("torch.", "") if params else None
        if a.compile:
            torch._dynamo.reset()
            step_model = torch.compile(unet, backend=a.compile_backend)
        is_lyco = handle is not None and handle.lyco_net is not None
        step, opt = make_step(step_model, ctx["inputs"], ctx["target"], params, floor, cuda, fused_ok=True,
                              lyco=is_lyco)
        if opt is not None:
            rec["optimizer"] = f"{type(opt).__module__}.{type(opt).__name__}"
        if cuda:
            fresh_memory()
        rec.update(run_steps(step, a.warmup, a.steps, cuda))
        if cuda:
            rec["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        key = f"{rec['algo']}/{variant}"
        if key in ctx.get("profile", ()) or rec["algo"] in ctx.get("profile", ()) or "all" in ctx.get("profile", ()):
            try:
                rec["profile"] = profile_step(step, cuda, top=ctx.get("profile_top", 15),
                                              makers=tuple(x for x in a.profile_makers.split(",") if x))
            except Exception as e:  # noqa: BLE001
                rec["profile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        del step, opt
        graph_algos = a.graph_algos.split(",")
        if a.graph and cuda and (algo is None or "all" in graph_algos or algo in graph_algos):
            fresh_memory()
            try:
                tkeys = ctx.get("graph_trace", ())
                traced = key in tkeys or rec["algo"] in tkeys or "all" in tkeys
                tpath = (Path(a.out) / f"graph_trace_{ctx['model']}_b{ctx['batch']}_{rec['algo']}_{variant}.json"
                         if traced else None)
                mkeys = ctx.get("memory_peak", ())
                mpath = (Path(a.out) / f"memory_peak_{ctx['model']}_b{ctx['batch']}_{rec['algo']}_{variant}.json"
                         if key in mkeys or rec["algo"] in mkeys or "all" in mkeys else None)
                rec.update(run_graph(step_model, ctx["inputs"], ctx["target"], params, floor,
                                     a.graph_steps or a.steps, lyco=is_lyco, trace=tpath, mem=mpath))
            except Exception as e:  # noqa: BLE001 — e.g. a host sync inside the step
                msg = str(e).strip().splitlines()
                rec["graph_error"] = f"{type(e).__name__}: {msg[0][:300] if msg else ''}"
    except Exception as e:  # noqa: BLE001 — one configuration's failure must not stop the run
        oom = cuda and isinstance(e, torch.cuda.OutOfMemoryError)
        rec["status"] = "oom" if oom else "error"
        msg = str(e).strip().splitlines()
        rec["error"] = f"{type(e).__name__}: {msg[0][:300] if msg else ''}"
        if not oom:
            rec["traceback"] = traceback.format_exc()[-2000:]
    finally:
        if restore is not None:
            restore()
        try:
            if handle is not None:
                handle.detach()
        except Exception as e:  # noqa: BLE001
            rec.setdefault("teardown_error", f"{type(e).__name__}: {e}")
        fixed = sanitize(unet, ctx["originals"])
        if fixed:
            rec["sanitized"] = fixed
        ctx["inputs"]["sample"].requires_grad_(False)
        ctx["inputs"]["sample"].grad = None
        handle = None
        step_model = None
        if a.compile:
            torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def describe(rec) -> str:
    head = f"[{rec['model']} b{rec['batch']}] {rec['algo']:<9} {rec['variant']:<22}"
    if rec["status"] != "ok":
        return f"{head} {rec['status'].upper()}: {rec.get('error', '')}"
    s = f"{head} {rec['median_ms']:8.2f} ms (p10 {rec['p10_ms']:.2f} p90 {rec['p90_ms']:.2f} host {rec.get('host_ms', 0):.1f})"
    if "graph_median_ms" in rec:
        s += f"  graph {rec['graph_median_ms']:.2f} ms"
        if "graph_trace" in rec:
            t = rec["graph_trace"]
            s += f" (traced: span {t['span'] / 1e3:.2f} = busy {t['busy'] / 1e3:.2f} + idle {t['idle'] / 1e3:.2f}, {t['count']} kernels)"
        elif "graph_trace_error" in rec:
            s += f" (trace failed: {rec['graph_trace_error'][:80]})"
    elif "graph_error" in rec:
        s += f"  graph FAIL ({rec['graph_error'][:60]})"
    if "peak_gib" in rec:
        s += f"  peak {rec['peak_gib']:6.2f} GiB"
    s += f"  train {rec['trainable_params'] / 1e6:.2f}M"
    c = rec.get("check")
    if c:
        s += (f"  check {'OK' if c['ok'] else 'FAIL'} full {c['full_err']:.1e} delta {c['delta_err']:.1e}"
              + (f" grad {c['grad_err']:.1e}" if c.get("grad_layers") else " grad n/a")
              + f" effect≥{c['min_effect']:.2f} ({c['layers_checked']} shapes)")
    m = rec.get("model_check")
    if m:
        s += f"  model-effect {m['effect']:.2f}{'' if m['finite'] else ' NONFINITE'}"
    s += f"  [{rec['wall_s']:.1f}s]"
    return s


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _fmt(rec, key, scale=1.0, digits=1):
    if rec is None:
        return "—"
    if rec["status"] != "ok":
        return rec["status"]
    v = rec.get(key)
    return "—" if v is None else f"{v * scale:.{digits}f}"


def merge_rounds(records: list[dict]) -> list[dict]:
    """One record per (model, batch, algo, variant): step times of every round pooled (median,
    p10, p90 recomputed), graph times as the median of the rounds' medians, peak the max."""
    out, by = [], {}
    for r in records:
        k = (r["model"], r["batch"], r["algo"], r["variant"])
        if k not in by:
            by[k] = dict(r)
            out.append(by[k])
            continue
        m = by[k]
        if r["status"] != "ok":
            continue
        if m["status"] != "ok":
            by[k].clear()
            by[k].update(r)
            continue
        m["times_ms"] = m.get("times_ms", []) + r.get("times_ms", [])
        m.update(_stats(m["times_ms"]))
        m["rounds"] = m.get("rounds", 1) + 1
        m["host_ms"] = statistics.median([m["host_ms"], r["host_ms"]]) if "host_ms" in r else m.get("host_ms")
        if "peak_gib" in r:
            m["peak_gib"] = max(m.get("peak_gib", 0.0), r["peak_gib"])
        if "graph_median_ms" in r:
            m.setdefault("_graph_meds", [m.get("graph_median_ms")] if "graph_median_ms" in m else [])
            m["_graph_meds"].append(r["graph_median_ms"])
            m["graph_median_ms"] = statistics.median(m["_graph_meds"])
    return out


def _table(rs, variants, algos, floor, key: str, with_mem: bool, summary: list | None, label: str):
    """One Markdown table of ``key`` (a time) per algorithm × variant, with lyco's ratios."""
    by = {(r["algo"], r["variant"]): r for r in rs}
    lines = ["| algo | " + " | ".join(variants) + " | lyco ÷ best peer (time" + (", mem" if with_mem else "")
             + ") | lyco ÷ floor (time" + (", mem" if with_mem else "") + ") |",
             "|---|" + "---|" * (len(variants) + 2)]
    ok = lambda r: r is not None and r["status"] == "ok" and r.get(key) is not None
    for al in algos:
        cells = []
        for v in variants:
            r = by.get((al, v))
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append(r["status"])
            elif r.get(key) is None:
                cells.append(r.get("graph_error", "—")[:40] if key.startswith("graph") else "—")
            else:
                star = "*" if (al, v) in NOT_THE_ALGORITHM else ""
                chk = r.get("check")
                bad = " (CHECK FAIL)" if chk is not None and not chk.get("ok") else ""
                mem = f" / {r['peak_gib']:.2f}" if with_mem and "peak_gib" in r else ""
                cells.append(f"{r[key]:.1f}{mem}{star}{bad}")
        ly = by.get((al, "lyco"))
        peers = [r for (a2, v), r in by.items() if a2 == al and VARIANTS.get(v, {}).get("lib") in ("lycoris", "peft")
                 and ok(r) and (a2, v) not in NOT_THE_ALGORITHM]
        ratio_peer = ratio_floor = "—"
        if ok(ly):
            if peers:
                bt = min(peers, key=lambda r: r[key])
                ratio_peer = f"{ly[key] / bt[key]:.2f} ({bt['variant']})"
                if with_mem:
                    bm = min(peers, key=lambda r: r.get("peak_gib", float("inf")))
                    if "peak_gib" in bm and "peak_gib" in ly:
                        ratio_peer += f", {ly['peak_gib'] / bm['peak_gib']:.2f} ({bm['variant']})"
            if ok(floor):
                ratio_floor = f"{ly[key] / floor[key]:.2f}"
                if with_mem and "peak_gib" in floor and "peak_gib" in ly:
                    ratio_floor += f", {ly['peak_gib'] / floor['peak_gib']:.2f}"
            if summary is not None:
                mem = f" {ly['peak_gib']:.2f} GiB" if "peak_gib" in ly else ""
                summary.append(f"{ly['model']} b{ly['batch']} {al:<9} [{label}]: lyco {ly[key]:.2f} ms{mem}"
                               f" | ÷best peer {ratio_peer} | ÷floor {ratio_floor}")
        lines.append(f"| {al} | " + " | ".join(cells) + f" | {ratio_peer} | {ratio_floor} |")
    return lines


# The tables of each model × batch, in order: (record key, heading, peak memory too, lines in the
# summary, summary label). The CUDA-graph table only where a record was timed as a graph.
_TABLES = [
    ("median_ms", "Eager: median step ms / peak GiB (peak includes the base model)", True, True, "eager median"),
    ("p10_ms", "Eager: p10 step ms (the fastest tenth: least host noise)", False, True, "eager p10"),
    ("host_ms", "Host issue time per step, ms (CPU time for the Python/launch side; ≈ step time → launch-bound)",
     False, False, "host"),
    ("graph_median_ms", "Whole step as one CUDA graph: median replay ms (device time, no launch overhead)",
     False, True, "cuda graph"),
]


def report(records, meta) -> tuple[str, list[str]]:
    lines = [f"# Training-step benchmark — {meta['device']}", "",
             f"torch {meta['torch']}, diffusers {meta.get('diffusers')}, lycoris-lora {meta.get('lycoris')}, "
             f"peft {meta.get('peft')}, triton {meta.get('triton')}; dtype {meta['dtype']}, adapter params "
             f"{meta['adapter_dtype']}; median of {meta['steps']} steps × {meta.get('rounds', 1)} round(s) after "
             f"{meta['warmup']} warm-up; compile={meta['compile']}; host CPUs {meta.get('host_cpus')}.", "",
             f"Measured ceilings: {meta.get('ceilings', 'n/a (CPU)')}.", ""]
    summary = []
    jobs = []
    for r in records:
        k = (r["model"], r["batch"])
        if k not in jobs:
            jobs.append(k)
    for model, batch in jobs:
        rs = [r for r in records if r["model"] == model and r["batch"] == batch]
        by = {(r["algo"], r["variant"]): r for r in rs}
        floor = by.get(("floor", "floor"))
        full = by.get(("fullft", "fullft"))
        variants = [v for v in VARIANTS if any(r["variant"] == v for r in rs)]
        algos = [al for al in ALGOS if any(r["algo"] == al for r in rs)]
        lines.append(f"## {model}, batch {batch}")
        lines.append("")
        for key, name in (("median_ms", "median"), ("p10_ms", "p10"), ("host_ms", "host issue time"),
                          ("graph_median_ms", "CUDA graph")):
            lines.append(f"{name}: floor {_fmt(floor, key, digits=2)} ms, full fine-tune {_fmt(full, key, digits=2)} ms"
                         + (f" (peak {_fmt(floor, 'peak_gib', digits=2)} / {_fmt(full, 'peak_gib', digits=2)} GiB)"
                            if key == "median_ms" else ""))
        lines.append("")
        graphed = any(r.get("graph_median_ms") is not None or r.get("graph_error") for r in rs)
        for key, heading, with_mem, summed, label in _TABLES:
            if key == "graph_median_ms" and not graphed:
                continue
            lines += [f"### {heading}", "",
                      *_table(rs, variants, algos, floor, key, with_mem, summary if summed else None, label), ""]
    notes = sorted({f"{r['algo']}/{r['variant']}: {r['note']}" for r in records if r.get("note")})
    if notes:
        lines.append("Notes (not counted as a peer): " + "; ".join(notes) + ".")
        lines.append("")
    gerr = sorted({f"{r['algo']}/{r['variant']}: {r['graph_error']}" for r in records if r.get("graph_error")})
    if gerr:
        lines.append("CUDA graph capture failed: " + "; ".join(gerr) + ".")
        lines.append("")
    skipped = [r for r in records if r["status"] == "skipped"]
    if skipped:
        lines.append(f"Skipped (time budget): {len(skipped)} configs: " +
                     ", ".join(f"{r['model']}/b{r['batch']}/{r['algo']}/{r['variant']}" for r in skipped))
    return "\n".join(lines) + "\n", summary


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse_jobs(a) -> list[tuple[str, int]]:
    if a.jobs:
        out = []
        for j in a.jobs.split(","):
            m, b = j.split(":")
            out.append((m, int(b)))
        return out
    models = a.models.split(",")
    out = []
    for m in models:
        bs = [int(b) for b in a.batches.split(",")] if a.batches else list(MODELS[m]["batches"])
        out += [(m, b) for b in bs]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd15,sdxl", help="sd15,sdxl")
    p.add_argument("--batches", default=None, help="batch sizes for every model (default: sd15 8,1; sdxl 4,1)")
    p.add_argument("--jobs", default=None, help="explicit ordered list model:batch,… (overrides --models/--batches)")
    p.add_argument("--libs", default="lyco,lycoris,peft", help="libraries to run (lyco, lycoris, peft)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"library variants, of {','.join(VARIANTS)}")
    p.add_argument("--algos", default=",".join(ALGOS), help=f"of {','.join(ALGOS)}")
    p.add_argument("--no-baselines", action="store_true", help="skip floor and full fine-tune")
    p.add_argument("--baselines", default="floor,fullft",
                   help="which baselines to run, a comma list of floor, floor-geglu, fullft (floor-geglu: "
                        "fuse_frozen_geglu's doc), e.g. --baselines floor,floor-geglu")
    p.add_argument("--graph-algos", default="all",
                   help="with --graph: the algorithms timed as a CUDA graph too ('all', or a comma list; "
                        "baselines always)")
    p.add_argument("--graph-steps", type=int, default=None, help="replays timed in graph mode (default --steps)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole plan this many times, interleaved (config A, B, …, A, B, …); the "
                        "step times of all rounds are pooled (host noise averages out across configs)")
    p.add_argument("--graph", action="store_true",
                   help="also time every config as one CUDA graph (whole step captured, replayed): device "
                        "time without launch overhead, same treatment for every library")
    p.add_argument("--profile-top", type=int, default=15, help="kernels listed per profiled config")
    p.add_argument("--profile", default="",
                   help="comma list of algo/variant (or algo, or 'floor', or 'all') to profile with "
                        "torch.profiler: top kernels, kernels/step, GPU busy fraction → profile*.{json,txt}")
    p.add_argument("--profile-makers", default="",
                   help="with --profile: comma list of kernel-name substrings whose launching ops (name, shapes, "
                        "enclosing ops, lyco's frame) are listed — records shapes and stacks, so slower")
    p.add_argument("--graph-makers", default="",
                   help="with --graph-trace: comma list of kernel-name substrings (none may contain a comma: "
                        "'elementwise_kernel<128' for elementwise_kernel<128, 4>) whose launching ops (name, shapes, "
                        "enclosing ops, lyco's frame) in one eager run of the captured step's paths are written to "
                        "graph_trace_*.makers.txt")
    p.add_argument("--graph-makers-top", type=int, default=25,
                   help="with --graph-makers: the launching-op groups listed per kernel pattern, largest first "
                        "(0: all)")
    p.add_argument("--graph-trace", default="",
                   help="with --graph: comma list of algo/variant (or algo, 'floor', 'all') whose captured step is "
                        "replayed once more under torch.profiler → graph_trace_*.json (benchmarks/graph_trace.py)")
    p.add_argument("--memory-peak", default="",
                   help="with --graph: comma list of algo/variant (or algo, 'floor', 'all') whose graph phase is "
                        "recorded by torch's allocator history → memory_peak_*.json (benchmarks/memory_peak.py)")
    p.add_argument("--skip", default="",
                   help="comma list of algo/variant pairs not to run (e.g. peers far from best in a previous run)")
    p.add_argument("--tag", default="", help="suffix of the output files (train_step<tag>.json/.md)")
    p.add_argument("--budget", type=float, default=470.0,
                   help="seconds from start; a config whose expected duration would end past it is skipped")
    p.add_argument("--deadline", type=float, default=None,
                   help="absolute end time (Unix seconds): the budget is cut to end by then (several "
                        "invocations sharing one device call)")
    p.add_argument("--compile", action="store_true",
                   help="run the UNet under torch.compile (default mode) — for every config alike: floor, "
                        "full fine-tune, lyco and the peers")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (inductor; aot_eager checks the plumbing without codegen)")
    p.add_argument("--adapter-dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--init-scale", type=float, default=0.3)
    p.add_argument("--alpha-scale", type=float, default=1.0,
                   help="lyco's alpha (and conv alpha) times this (default 1: alpha = rank, γ = 1; e.g. 0.5 for "
                        "alpha = rank/2, as users often train) — the peers keep alpha = rank")
    p.add_argument("--lycoris-tune", default=None, choices=("on", "off"),
                   help="LYCORIS_KERNEL_TUNE for the Triton kernels (default: LyCORIS's own, on)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models, 2 steps: exercise the whole script")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--lyco-grad-sink", action="store_true",
                   help="with --graph: lyco's captured step as its trainer's — factor gradients added into kept .grad "
                        "tensors by the ops (casts.step_casts(grad_sink=True)); the peers' steps unchanged")
    p.add_argument("--frozen-cl", default="off", choices=("off", "all", "rule", "model"),
                   help="the frozen k×k convs' weights stored channels-last: all, or where the weight outsizes the "
                        "conv's input at the job's batch (rule); session 37's experiment")
    p.add_argument("--sdpa", default="auto", choices=("auto", "flash", "efficient", "cudnn", "math"),
                   help="the attention backend of every configuration alike (floor, lyco, peers): auto = torch's "
                        "choice; else only that backend enabled (torch.backends.cuda.enable_*_sdp)")
    a = p.parse_args(argv)
    _GRAD_SINK[0] = a.lyco_grad_sink
    _GRAPH_MAKERS[0] = tuple(x for x in a.graph_makers.split(",") if x)
    _GRAPH_MAKERS_TOP[0] = a.graph_makers_top if a.graph_makers_top > 0 else 10 ** 9
    unknown = [b for b in a.baselines.split(",") if b and b not in BASELINES]
    if unknown:
        p.error(f"--baselines {a.baselines!r}: unknown {', '.join(unknown)}; expected a comma list of "
                f"{', '.join(BASELINES)}")

    t_start = time.perf_counter()
    if a.deadline is not None:
        a.budget = min(a.budget, a.deadline - time.time())
    torch.manual_seed(0)
    cuda = torch.cuda.is_available() and not a.smoke
    quiet_libraries()
    if a.lycoris_tune is not None:
        os.environ["LYCORIS_KERNEL_TUNE"] = a.lycoris_tune
    if a.smoke:
        torch.set_num_threads(1)
        a.steps = min(a.steps, 2)
        a.warmup = min(a.warmup, 1)
        for al, ov in SMOKE_OVERRIDES.items():
            for lib, kw in ov.items():
                ALGOS[al][lib] = {**ALGOS[al][lib], **kw}
    if not cuda and not a.smoke:
        p.error("no CUDA device: use --smoke for the CPU check")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    adapter_dtype = torch.bfloat16 if a.adapter_dtype == "bf16" else torch.float32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False
        if a.sdpa != "auto":  # one backend for the whole process: the floor and every library run the same one
            on = "mem_efficient" if a.sdpa == "efficient" else a.sdpa
            for name in ("flash", "mem_efficient", "cudnn", "math"):
                fn = getattr(torch.backends.cuda, f"enable_{name}_sdp", None)
                if fn is not None:
                    fn(name == on)
        if os.environ.get("LYCO_PROBE_SM_CARVEOUT"):  # session 42's probe (experiments/sm_carveout.py)
            sys.path.insert(0, str(Path(__file__).parent / "experiments"))
            import sm_carveout
            print("sm carveout:", sm_carveout.apply(int(os.environ["LYCO_PROBE_SM_CARVEOUT"])), flush=True)
        if a.graph_trace:  # the profiler sees a graph's kernels only if it ran before the first capture
            from torch.profiler._utils import _init_for_cuda_graphs
            _init_for_cuda_graphs()
    meta = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'cpu'}) smoke",
            **machine_info("torch", "python", "diffusers", "peft", "transformers", "triton", "lycoris"),
            "dtype": "bf16", "adapter_dtype": a.adapter_dtype, "steps": a.steps,
            "warmup": a.warmup, "compile": a.compile and a.compile_backend, "smoke": a.smoke, "argv": sys.argv[1:],
            "rounds": a.rounds, "graph": a.graph, "sdpa": a.sdpa, **machine_info(host_cpus="logical_cpus")}
    if cuda:
        meta["ceilings"] = ceilings(device)
    log(json.dumps(meta))
    libs = set(a.libs.split(","))
    variants = [v for v in a.variants.split(",") if v and VARIANTS[v]["lib"] in libs]
    algos = [x for x in a.algos.split(",") if x]
    for x in algos:
        if x not in ALGOS:
            p.error(f"unknown algo {x!r}")
    jobs = parse_jobs(a)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []

    tag = a.tag
    profile_set = {x for x in a.profile.split(",") if x}
    skip = {x for x in a.skip.split(",") if x}
    profiles: dict[str, dict] = {}

    def save():
        (out_dir / f"train_step{tag}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        try:  # the table so far (a run cut short by a time limit still leaves one)
            (out_dir / f"train_step{tag}.md").write_text(report(merge_rounds(records), meta)[0])
        except Exception:  # noqa: BLE001
            pass

    unets = {}
    for model, batch in jobs:
        if time.perf_counter() - t_start > a.budget:
            records.append({"model": model, "batch": batch, "algo": "*", "variant": "*", "status": "skipped"})
            log(f"[{model} b{batch}] skipped (time budget)")
            continue
        if model not in unets:
            for m in list(unets):  # one model on the device at a time
                del unets[m]
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            t = time.perf_counter()
            unets[model] = build_unet(model, a.smoke, device, dtype)
            names = layer_sets(unets[model])
            log(f"[{model}] built in {time.perf_counter() - t:.1f}s: {len(names['lin'])} lin, "
                f"{len(names['conv'])} conv layers; {count(unets[model].parameters()) / 1e6:.0f}M params")
        unet = unets[model]
        if a.frozen_cl != "off":  # a layout for this batch: the model again from its config
            del unets[model], unet
            unets[model] = unet = build_unet(model, a.smoke, device, dtype)
            log(f"[{model} b{batch}] frozen k×k conv weights channels-last ({a.frozen_cl}): "
                f"{frozen_weights_cl(unet, a.frozen_cl, batch, SMOKE_LATENT if a.smoke else MODELS[model]['latent'], device, dtype)}")
        names = layer_sets(unet)
        originals = snapshot_modules(unet, names["lin+conv"])
        latent = SMOKE_LATENT if a.smoke else MODELS[model]["latent"]
        inputs, target = make_inputs(unet, batch, latent, device, dtype)
        inputs1 = {k: (v[:1] if torch.is_tensor(v) else {kk: vv[:1] for kk, vv in v.items()}) for k, v in inputs.items()}
        with torch.no_grad():
            base_out1 = unet(**inputs1, return_dict=False)[0]
        ctx = dict(args=a, unet=unet, cuda=cuda, dtype=dtype, adapter_dtype=adapter_dtype, names=names,
                   originals=originals, inputs=inputs, inputs1=inputs1, base_out1=base_out1, target=target,
                   model=model, batch=batch, profile=profile_set, profile_top=a.profile_top,
                   graph_trace={x for x in a.graph_trace.split(",") if x},
                   memory_peak={x for x in a.memory_peak.split(",") if x})
        plan = [] if a.no_baselines else [(None, b) for b in BASELINES if b in a.baselines.split(",")]
        # first every algorithm against its main peers, then the secondary variants (LyCORIS eager…)
        ordered = [(al, v) for al in algos for v in variants if v not in SECONDARY_VARIANTS]
        ordered += [(al, v) for al in algos for v in variants if v in SECONDARY_VARIANTS]
        for al, v in ordered:
            if VARIANTS[v]["lib"] == "peft" and ALGOS[al]["peft"] is None:
                continue
            if "only" in VARIANTS[v] and al not in VARIANTS[v]["only"]:
                continue
            if f"{al}/{v}" in skip:
                continue
            if (al, v) in UNSUPPORTED:
                records.append({"model": model, "batch": batch, "algo": al, "variant": v, "status": "n/a",
                                "note": UNSUPPORTED[(al, v)]})
                continue
            plan.append((al, v))
        walls: dict[str, list[float]] = {}
        plan = [(al, v, r) for r in range(a.rounds) for al, v in plan]
        for al, v, rnd in plan:
            elapsed = time.perf_counter() - t_start
            same = walls.get(v)
            every = [w for ws in walls.values() for w in ws]
            est = max(same) if same else (statistics.median(every) if every else 0.0)
            if elapsed + est > a.budget:
                rec = {"model": model, "batch": batch, "algo": al or v, "variant": v, "status": "skipped"}
                records.append(rec)
                log(f"[{model} b{batch}] {al or v} {v}: skipped (time budget: {elapsed:.0f}s + ~{est:.0f}s > {a.budget:.0f}s)")
                continue
            ctx["profile"] = profile_set if rnd == 0 else set()
            rec = run_config(ctx, al, v)
            rec["round"] = rnd
            if "profile" in rec:
                profiles[f"{model} b{batch} {rec['algo']}/{v}"] = rec.pop("profile")
                (out_dir / f"profile{tag}.json").write_text(json.dumps(profiles, indent=1))
                (out_dir / f"profile{tag}.txt").write_text(
                    "\n\n".join(format_profile(k, pr) for k, pr in profiles.items()) + "\n")
            walls.setdefault(v, []).append(rec["wall_s"])
            records.append(rec)
            log(describe(rec))
            save()
        del ctx, inputs, target, inputs1, base_out1

    meta["total_s"] = time.perf_counter() - t_start
    save()
    md, summary = report(merge_rounds(records), meta)
    if profiles:
        md += "\n## Profiles (top kernels by self device time per step)\n\n```\n" + "\n\n".join(
            format_profile(k, pr) for k, pr in profiles.items()) + "\n```\n"
    (out_dir / f"train_step{tag}.md").write_text(md)
    log("")
    log(md)
    log("lyco vs best peer and vs floor (time ratio, memory ratio):")
    for s in summary:
        log("  " + s)
    errors = [r for r in records if r["status"] in ("error",)]
    if errors:
        log(f"{len(errors)} config(s) failed: " + "; ".join(f"{r['algo']}/{r['variant']}: {r.get('error')}" for r in errors))
    log(f"total {meta['total_s']:.1f}s; wrote {out_dir / f'train_step{tag}.json'} and {out_dir / f'train_step{tag}.md'}")


if __name__ == "__main__":
    main()

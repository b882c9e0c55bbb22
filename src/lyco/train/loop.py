"""The trainer: noise-prediction training of a lyco adapter on a diffusers SD1/SD2/SDXL pipeline.

Built on accelerate: the same code runs on one CPU, one GPU, or ``accelerate launch -m lyco train
…`` over several processes (DDP). The only module accelerate wraps is :class:`TrainingModule`,
which owns the adapter (the base model's weights are frozen and not registered in it), so DDP
synchronises exactly the adapter's gradients. Only the main process writes files, logs and
samples. There is no communication code here beyond accelerate's own calls (``gather`` of the
loss, ``wait_for_everyone`` around files).

Exact resume. Everything random is a pure function of the position in training, not of a
stream that has to be replayed: the data order of an epoch is seeded by ``(seed, epoch)``, the
augmentation of a sample by ``(seed, epoch, slot)`` (see :mod:`lyco.train.data`), and before each
micro-batch the noise generator and torch's global RNG (adapter dropout) are seeded by
``(seed, epoch, micro-batch, process)``. A state holds the adapter, the optimizer, the LR
scheduler, the position (epoch, micro-batches done, step) and, for completeness, the torch /
python / numpy RNG states; resuming from it recomputes the same batches, noise and updates, so
an interrupted and resumed run ends with the bit-identical adapter on CPU.

States are a folder ``<name>-step00000010-state/`` with ``state.safetensors`` (tensors) and
``state.json`` (everything else), written into a temporary folder and renamed into place. No
pickle anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, LycoError
from ..models import layout
from . import data as data_mod
from .config import Config, check_runnable, resolve_cuda_graph

log = logging.getLogger("lyco.train")

STATE_FORMAT = "lyco-train-state"
STATE_VERSION = 1


class TrainingError(LycoError):
    """The run cannot go on (NaN/Inf loss, a state that does not fit, …)."""


#: what a run that went NaN/Inf can change
_DIVERGED_ADVICE = "Lower the learning rate, enable max_grad_norm, or use bf16 instead of fp16."


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    adapter_path: str | None
    output_dir: str
    steps: int
    epochs: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    sample_grids: list[str] = field(default_factory=list)
    loss_curve: str | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------


def load_base_pipeline(cfg: Config):
    """The diffusers pipeline of ``[model] path`` (``tiny:sd1`` etc. build the built-in tiny models)."""
    path = cfg.model.path
    fam = cfg.model.family or None
    if path.startswith("tiny:"):
        from ..models import tiny
        kind = path.split(":", 1)[1] or "sd1"
        if kind not in ("sd1", "sd2", "sdxl"):
            raise ConfigError(f"[model] path: unknown built-in model {path!r}; use tiny:sd1, tiny:sd2 or tiny:sdxl")
        return tiny.tiny_pipeline(kind, seed=0)
    if not os.path.exists(path):
        raise ConfigError(f"[model] path: {path!r} does not exist (a diffusers folder or a single-file "
                          f"checkpoint is expected)")
    from ..formats.checkpoint import load_pipeline
    toks = {}
    for key in ("tokenizer", "tokenizer_2"):
        folder = getattr(cfg.model, key)
        if folder:
            from transformers import CLIPTokenizer
            try:
                toks[key] = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
            except Exception as e:  # noqa: BLE001 — transformers raises many kinds
                raise ConfigError(f"[model] {key}: cannot read a CLIP tokenizer from {folder!r} ({e})") from None
    return load_pipeline(path, family=fam, prediction_type=cfg.model.prediction_type or None, **toks)


def pipeline_family(pipe, forced: str = "") -> str:
    if forced:
        return forced
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    from ..models.configs import family_of_unet_config
    return family_of_unet_config(dict(pipe.unet.config))


def base_model_hashes(path: str) -> tuple[str, str]:
    """``(ss_sd_model_hash, ss_new_sd_model_hash)``: of the file, or of a diffusers folder's UNet
    weights file; empty for the built-in tiny models."""
    from ..formats.metadata import sd_model_hashes
    if not path or path.startswith("tiny:"):
        return "", ""
    p = Path(path)
    if p.is_dir():
        cands = sorted((p / "unet").glob("diffusion_pytorch_model*.safetensors")) or sorted((p / "unet").glob("*.bin"))
        if not cands:
            return "", ""
        p = cands[0]
    try:
        return sd_model_hashes(str(p))
    except OSError:
        return "", ""


def build_network(pipe, cfg: Config, family: str):
    """The trainable :class:`~lyco.network.Network` of ``[network]`` on the pipeline's UNet and/or
    text encoder(s), attached. Returns ``(network, text_encoder_trained)``. A component with learning
    rate 0 or ``train_unet``/``train_text_encoder`` false gets no adapter at all."""
    n, o = cfg.network, cfg.optimizer
    comps: dict[str, nn.Module] = {}
    if n.train_unet and o.unet_lr != 0:
        comps["unet"] = pipe.unet
    train_te = bool(n.train_text_encoder and o.text_encoder_lr != 0)
    if train_te:
        comps["text_encoder"] = pipe.text_encoder
        if family == "sdxl":
            comps["text_encoder_2"] = pipe.text_encoder_2
    if not comps:
        raise ConfigError("nothing to train: the UNet and the text encoder are both off "
                          "(train_unet/train_text_encoder false or learning rate 0)")
    from ..network import Network
    extra: dict[str, Any] = {}
    if n.dora:
        extra["dora"] = True
        extra["dora_axis"] = n.dora_axis
    reserved = {"algo", "rank", "alpha", "preset", "conv_rank", "conv_alpha", "overrides", "seed", "dora",
                "dora_axis", "components", "dtype", "mode", "freeze_base", "multiplier"}
    bad = sorted(set(n.options) & reserved)
    if bad:
        raise ConfigError(f"[network.options] {bad}: set these as [network] keys, not options")
    net = Network.create(comps, algo=n.algo, rank=n.rank, alpha=n.alpha, preset=n.preset, conv_rank=n.conv_rank,
                         conv_alpha=n.conv_alpha, overrides=list(n.overrides) or None, seed=cfg.train.seed,
                         mode=n.mode, **extra, **dict(n.options))
    net.family = family
    net.train()
    if train_te and not any(not str(layer.name).startswith("unet") for layer in net.layers.values()):
        train_te = False  # the preset put nothing on the text encoder
    return net, train_te


# --------------------------------------------------------------------------------------
# Text encoding
# --------------------------------------------------------------------------------------


class TextEncoding:
    """Captions → (encoder_hidden_states, pooled) the way the diffusers pipelines do it.

    SD1/SD2: the last layer's output (or, with ``clip_skip`` N > 1, the N-th last hidden state
    through the final layer norm). SDXL: penultimate hidden states of both encoders
    concatenated, pooled = the second encoder's projected output.
    """

    def __init__(self, pipe, family: str, clip_skip: int = 1):
        self.family = family
        self.clip_skip = clip_skip
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
        self.encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
        if any(t is None for t in self.tokenizers):
            raise ConfigError("the base model has no tokenizer (a real single-file checkpoint carries none): "
                              "use a diffusers folder")
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def tokenize(self, captions: Sequence[str]) -> list[torch.Tensor]:
        return [tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in self.tokenizers]

    def encode(self, ids: Sequence[torch.Tensor]):
        if self.family == "sdxl":
            hs, pooled = [], None
            for i, (te, x) in enumerate(zip(self.encoders, ids)):
                out = te(x.to(te.device), output_hidden_states=True)
                hs.append(out.hidden_states[-2])
                if i == 1:
                    pooled = out[0]
            return torch.cat(hs, dim=-1), pooled
        te = self.encoders[0]
        x = ids[0].to(te.device)
        if self.clip_skip <= 1:
            return te(x)[0], None
        out = te(x, output_hidden_states=True)
        h = out.hidden_states[-self.clip_skip]
        tm = getattr(te, "text_model", te)
        return tm.final_layer_norm(h), None

    @torch.no_grad()
    def encode_cached(self, captions: Sequence[str]):
        """Frozen encoders: one caption at a time (so a value never depends on what it was batched
        with), remembered per caption."""
        hs, ps = [], []
        for c in captions:
            if c not in self.cache:
                if len(self.cache) > 8192:
                    self.cache.clear()
                h, p = self.encode(self.tokenize([c]))
                self.cache[c] = (h[0].detach(), p[0].detach() if p is not None else None)
            h, p = self.cache[c]
            hs.append(h)
            ps.append(p)
        return torch.stack(hs), (torch.stack(ps) if ps[0] is not None else None)


class TrainingModule(nn.Module):
    """The module accelerate prepares (and DDP wraps): the adapter is its only registered child; the
    UNet and text encoders are referenced, not registered (frozen, not synchronised). Under FSDP
    (``register_unet``) the UNet is a registered child too, so that it is sharded inside this root."""

    def __init__(self, network: nn.Module, unet: nn.Module, text: TextEncoding, register_unet: bool = False):
        super().__init__()
        self.network = network
        if register_unet:
            self.unet = unet
        object.__setattr__(self, "_unet", unet)
        object.__setattr__(self, "_text", text)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids=None, hidden=None, pooled=None,
                time_ids=None):
        if hidden is None:
            hidden, pooled = self._text.encode(input_ids)
        added = None
        if self._text.family == "sdxl":
            added = {"text_embeds": pooled.to(noisy.dtype) if pooled is not None else pooled,
                     "time_ids": time_ids.to(noisy.device)}
        return self._unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


# --------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------


def make_optimizer(cfg: Config, groups: list[dict], flat_ok: bool = True):
    """The configured optimizer over ``groups``. AdamW is :class:`lyco.optim.FlatAdamW` (``[optimizer] flat``, on
    by default: one update launch per group instead of one per few dozen tensors — run 112, benchmarks/NOTES.md)
    unless ``flat_ok`` is False (FSDP's local shards) or ``args`` asks for an option only torch's class has."""
    o = cfg.optimizer
    kw: dict[str, Any] = {"lr": o.learning_rate, "weight_decay": o.weight_decay}
    if o.type in ("adamw", "adamw8bit", "prodigy"):
        kw["betas"] = tuple(o.betas)
    if o.type in ("adamw", "adamw8bit"):
        kw["eps"] = o.eps
    kw.update(o.args)
    if o.type == "adamw":
        from ..optim import FlatAdamW, flat_adamw_supports
        cls = FlatAdamW if (o.flat and flat_ok and flat_adamw_supports(kw)) else torch.optim.AdamW
    elif o.type == "adamw8bit":
        try:
            import bitsandbytes as bnb  # type: ignore
        except ImportError:
            raise ConfigError("[optimizer] type = 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from None
        cls = bnb.optim.AdamW8bit
    else:
        try:
            from prodigyopt import Prodigy  # type: ignore
        except ImportError:
            raise ConfigError("[optimizer] type = 'prodigy' needs prodigyopt: pip install prodigyopt") from None
        cls = Prodigy
    try:
        return cls(groups, **kw)
    except TypeError as e:
        raise ConfigError(f"[optimizer] {o.type}: bad arguments {sorted(kw)}: {e}") from None


def lr_lambda(kind: str, warmup: int, total: int, cycles: int = 1) -> Callable[[int], float]:
    total = max(1, total)

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
        raise ConfigError(f"unknown lr_scheduler {kind!r}")
    return f


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _seed_of(*parts) -> int:
    return int(hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()[:15], 16)


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def _atomic_text(path: str, text: str) -> None:
    from ..formats.safetensors_io import atomic_write
    with atomic_write(path, overwrite=True) as f:
        f.write(text.encode("utf-8"))


def _replace_dir(tmp: str, final: str) -> None:
    """Move a finished temporary folder into place; an old folder of that name is removed only
    after the new one is in place."""
    old = None
    if os.path.exists(final):
        old = final + f".old-{os.getpid()}-{int(time.time() * 1000)}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Several processes: DDP settings, one flat all-reduce, FSDP2 sharding
# --------------------------------------------------------------------------------------


def ddp_kwargs(dist_cfg, find_unused: bool = False) -> dict[str, Any]:
    """The ``DistributedDataParallel`` arguments of ``[distributed]`` (given to accelerate's
    ``DistributedDataParallelKwargs``; the DDP scaling benchmark wraps with the same ones).

    * ``broadcast_buffers=False``: DDP's default re-broadcasts every module buffer from rank 0
      before *each* forward (one flatten, one collective and one copy kernel per buffer). The
      adapter's buffers are constants (``alpha``, ``on_input``: one per adapted layer, identical on
      every rank by construction), so that is a collective that synchronises the ranks at the start
      of every step plus ~200 kernel launches for nothing.
    * ``gradient_as_bucket_view=True``: gradients live in DDP's all-reduce buckets (no copy of every
      gradient into its bucket after backward); the trainer then zeroes gradients instead of
      setting them to ``None`` so the views persist.
    * ``static_graph``: the same parameters take part every step unless a dropout-family option
      (``module_dropout``) or DyLoRA changes that — then DDP must search for unused parameters
      instead, and static_graph is off.

    With :func:`register_ddp_hook` on top, DDP launches no kernel per parameter at all.
    """
    kw: dict[str, Any] = {"find_unused_parameters": bool(find_unused), "broadcast_buffers": False,
                          "gradient_as_bucket_view": True, "bucket_cap_mb": float(dist_cfg.ddp_bucket_mb)}
    if dist_cfg.ddp_static_graph and not find_unused:
        kw["static_graph"] = True
    return kw


def register_ddp_hook(ddp_model) -> None:
    """All-reduce DDP's buckets through torch's plain all-reduce hook (divide the bucket by the world
    size, sum). Without a hook, DDP divides every gradient into its bucket view itself: one kernel per
    parameter per step (384 for a LoRA on SD1.5's attention/MLP layers), launched from the backward
    pass; with the hook and gradients that already live in the buckets, it is one division per bucket.
    The same arithmetic (g / W summed over ranks)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    ddp_model.register_comm_hook(state=None, hook=default_hooks.allreduce_hook)


class FlatGradSync:
    """``[distributed] ddp_comm = "flat"``: the module is not wrapped in DDP; after the backward pass of
    each optimizer step the gradients of all trainable parameters are averaged with *one* all-reduce
    of one flat buffer per dtype (no per-parameter hooks, no buckets, no overlap with the backward
    pass). A parameter without a gradient on a rank contributes zeros (module dropout)."""

    def __init__(self, params: Sequence[torch.Tensor], dist=None):
        if dist is None:
            import torch.distributed as dist
        self.dist = dist
        self.params = [p for p in params if p.requires_grad]
        self.world = dist.get_world_size()
        self._flats: list[torch.Tensor] | None = None
        self._grads: tuple[torch.Tensor, ...] = ()

    def adopt(self, flats: Sequence[torch.Tensor] | None) -> bool:
        """Average the gradients by all-reducing ``flats`` in place (one collective and one division per
        buffer, no copies) when every parameter's gradient is a view into one of them and together they
        cover nothing else — what :meth:`lyco.train.graphs.GraphedStep.ensure_grads` makes. Checked
        here; on a later step the gradients must still be those same tensors (zeroed, not replaced),
        else :meth:`sync` falls back to copying. Returns whether the buffers were adopted."""
        if not flats:
            return False
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            return False
        covered = {id(f): 0 for f in flats}
        for g in grads:
            base = g._base
            if base is None or id(base) not in covered:
                return False
            covered[id(base)] += g.numel()
        if any(covered[id(f)] != f.numel() for f in flats):
            return False
        self._flats, self._grads = list(flats), tuple(grads)
        return True

    def broadcast_parameters(self) -> None:
        """Rank 0's values everywhere (every rank builds the same adapter from the same seed; this makes
        it certain, as DDP does at wrap time)."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
        with torch.no_grad():
            for group in self._by_dtype([p.data for p in self.params]):
                flat = _flatten_dense_tensors(group)
                self.dist.broadcast(flat, 0)
                for t, v in zip(group, _unflatten_dense_tensors(flat, group)):
                    t.copy_(v)

    @staticmethod
    def _by_dtype(tensors):
        groups: dict[torch.dtype, list] = {}
        for t in tensors:
            groups.setdefault(t.dtype, []).append(t)
        return list(groups.values())

    def sync(self) -> None:
        if self._flats is not None and all(p.grad is g for p, g in zip(self.params, self._grads)):
            with torch.no_grad():
                for flat in self._flats:
                    self.dist.all_reduce(flat)
                    flat.div_(self.world)
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        with torch.no_grad():
            for grads in self._by_dtype([p.grad for p in self.params]):
                flat = _flatten_dense_tensors(grads)
                self.dist.all_reduce(flat)
                flat.div_(self.world)
                for g, v in zip(grads, _unflatten_dense_tensors(flat, grads)):
                    g.copy_(v)


#: diffusers UNet modules that become one FSDP unit each (innermost first); the UNet itself is one more
#: unit for what is left (conv_in, time embedding, conv_out …)
FSDP_UNIT_CLASSES = ("BasicTransformerBlock", "ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D")


def fsdp_shard(root: nn.Module, base: nn.Module, network: nn.Module, *, device: torch.device,
               reshard_after_forward: bool = True, unit_classes: Sequence[str] = FSDP_UNIT_CLASSES):
    """Shard the frozen ``base`` (a UNet registered inside ``root``) and the adapter ``network`` over
    all processes with FSDP2 ``fully_shard``; returns the device mesh.

    Units: every module of ``unit_classes`` (transformer blocks, ResNet blocks, …), then ``base``
    itself, then ``root``. An adapter layer's parameters go into the unit of the base layer it sits
    on: the adapter is used inside that unit's forward, so FSDP gathers it with the block's weights
    just before the block runs and reduce-scatters its gradient right after the block's backward. To
    make FSDP see them there, each unit gets its adapter layers as an extra registered child
    (``_lyco_adapters``); the root unit ignores those parameters (they are managed once, by their
    unit) and keeps what sits on no UNet layer (text-encoder adapters, whose base is not sharded).

    Within a unit only the adapter is trainable (FSDP2 allows frozen and trainable parameters in one
    unit; the trainable ones must share a dtype: the adapter's fp32). No ``MixedPrecisionPolicy``:
    the base is already in the training dtype, the adapter is gathered in fp32 and autocast does the
    compute casts exactly as on one GPU, and gradients are reduced in fp32.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    names = set(unit_classes)
    units = [base] + [m for m in base.modules() if m is not base and type(m).__name__ in names]  # pre-order
    owner: dict[int, nn.Module] = {}
    for u in units:  # ancestors first, so the innermost unit wins
        for m in u.modules():
            owner[id(m)] = u
    per_unit: dict[int, list[nn.Module]] = {}
    for layer in network.layers.values():
        host = getattr(layer, "host", None)
        u = owner.get(id(host.module)) if host is not None else None
        if u is not None:
            per_unit.setdefault(id(u), []).append(layer)
    for u in reversed(units):  # innermost first
        ads = per_unit.get(id(u))
        if ads:
            u.add_module("_lyco_adapters", nn.ModuleList(ads))
        if any(True for _ in u.parameters()):
            fully_shard(u, mesh=mesh, reshard_after_forward=reshard_after_forward)
    in_units = {p for ads in per_unit.values() for a in ads for p in a.parameters()}  # the sharded ones
    fully_shard(root, mesh=mesh, ignored_params=in_units)
    # Make `root` the FSDP root now (FSDP picks the first module that runs forward; a sample grid at
    # step 0 calls the UNet directly and would otherwise become a second root).
    root._get_fsdp_state()._lazy_init()
    for layer in network.layers.values():
        layer._invalidate()  # cached forward tensors referred to the parameters before sharding
    return mesh


class LocalShards:
    """The optimizer's view of FSDP parameters: each process's local shard as a plain tensor.

    FSDP parameters are DTensors; an optimizer over them runs every elementwise op through DTensor
    dispatch, whose sharding propagation for foreach ops over hundreds of tensors costs seconds per
    step (torch 2.11–2.13). AdamW is elementwise, so it is run on the local shards instead: plain
    tensors sharing storage with the DTensors (the update lands in FSDP's shards), whose gradients are
    the local parts of the reduce-scattered gradients. Optimizers that reduce over all parameters
    (Prodigy's estimate of d) would see only a shard: the config rejects them with FSDP."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        self.local = [p.to_local().detach() for p in self.params]
        self._of = {id(p): l for p, l in zip(self.params, self.local)}
        self._param = {id(l): p for p, l in zip(self.params, self.local)}

    def local_of(self, p: torch.Tensor) -> torch.Tensor:
        return self._of[id(p)]

    def param_of(self, local: torch.Tensor) -> torch.Tensor | None:
        return self._param.get(id(local))

    def grads_to_local(self) -> None:
        for p, l in zip(self.params, self.local):
            cur = p.to_local()
            if cur.data_ptr() != l.data_ptr():  # FSDP re-allocated the shard: follow it
                l.data = cur.detach()
            l.grad = p.grad.to_local() if p.grad is not None else None

    def zero_grad(self) -> None:
        for p, l in zip(self.params, self.local):
            p.grad = None
            l.grad = None

    def as_sharded(self, local_state: torch.Tensor, like_local: torch.Tensor):
        """A tensor of the shape of ``like_local``'s parameter shard (optimizer state) as a DTensor of
        that parameter's layout (no communication)."""
        p = self.param_of(like_local)
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(local_state, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module | None):
    """FSDP: every unit's full parameters are registered for the duration (collective: every process
    enters it). Used to export the adapter with the same code as one GPU and to sample. No-op for
    an unsharded model. (``state_dict()`` of a sharded module reshards first: use
    :func:`full_tensors` for state dicts.)"""
    mods = fsdp_modules(model) if model is not None else []
    for m in mods:
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()


def is_sharded(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (collective), the tensor itself otherwise."""
    return t.detach().full_tensor() if is_sharded(t) else t.detach()


def full_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`full_tensor` of every tensor of a list, with one all-gather per dtype for the FSDP shards
    (row shards of a 1-D mesh, ``torch.chunk`` layout) instead of one per tensor — a state holds
    hundreds of small tensors. Every process calls it with the same list (shapes, dtypes, order)."""
    out = [t.detach() for t in tensors]
    ids = [i for i, t in enumerate(out) if is_sharded(t)]
    if not ids:
        return out
    from torch.distributed.tensor import Shard
    simple = [i for i in ids if out[i].device_mesh.ndim == 1 and tuple(out[i].placements) == (Shard(0),)
              and out[i].dim() >= 1]
    for i in set(ids) - set(simple):
        out[i] = out[i].full_tensor()
    if not simple:
        return out
    import torch.distributed as dist
    mesh = out[simple[0]].device_mesh
    group = mesh.get_group()
    world, me = group.size(), mesh.get_local_rank()

    def rows(n: int) -> list[int]:  # rows of each rank, torch.chunk semantics (trailing ranks may get none)
        c = -(-n // world) if n else 0
        return [max(0, min(c, n - r * c)) for r in range(world)]

    by_dtype: dict[torch.dtype, list[int]] = {}
    for i in simple:
        by_dtype.setdefault(out[i].dtype, []).append(i)
    for dtype, group_ids in by_dtype.items():
        lay = {i: (rows(out[i].shape[0]), math.prod(out[i].shape[1:])) for i in group_ids}
        lengths = [sum(lay[i][0][r] * lay[i][1] for i in group_ids) for r in range(world)]
        width = max(lengths)
        local = torch.cat([out[i].to_local().reshape(-1) for i in group_ids])
        if local.numel() != lengths[me]:
            raise RuntimeError(f"FSDP shard layout differs from torch.chunk: {local.numel()} != {lengths[me]}")
        buf = torch.zeros(width, dtype=dtype, device=local.device)
        buf[: local.numel()] = local
        allbuf = torch.empty(world * width, dtype=dtype, device=local.device)
        # all_gather_single is the newer name (torch ≥ 2.13 deprecates the older one)
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(allbuf, buf, group=group)
        offs = [r * width for r in range(world)]
        for i in group_ids:
            rs, inner = lay[i]
            parts = []
            for r in range(world):
                n = rs[r] * inner
                parts.append(allbuf[offs[r]: offs[r] + n])
                offs[r] += n
            out[i] = torch.cat(parts).reshape(out[i].shape)
    return out


def shard_like(full: torch.Tensor, like) -> torch.Tensor:
    """``full`` laid out as the sharded ``like`` (every process holds ``full``; each keeps its shard)."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.detach().to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total gradient norm (and the clip to ``max_norm`` when > 0) for plain or FSDP-sharded gradients.

    Shards are handled through their local parts (the local parts of all processes partition each
    tensor: the squared norms add up over one all-reduce) rather than with foreach ops on DTensors,
    whose per-op sharding propagation costs seconds per step for hundreds of adapter tensors."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [g for g in grads if is_sharded(g)]
    if not sharded:
        total = torch.nn.utils.get_total_norm(grads)
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
        return total
    import torch.distributed as dist
    with torch.no_grad():
        local = [g.to_local() for g in sharded]
        plain = [g for g in grads if not is_sharded(g)]
        sq = torch.stack(torch._foreach_norm(local)).float().pow(2).sum()
        dist.all_reduce(sq, group=sharded[0].device_mesh.get_group())
        if plain:  # the same on every process: added once, after the reduction
            sq = sq + torch.stack(torch._foreach_norm(plain)).float().pow(2).sum().to(sq.device)
        total = sq.sqrt()
        if max_norm > 0:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(local + plain, coef)
    return total


# --------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------


def _host_decided_layer(network) -> str | None:
    """The first adapter layer whose training step makes a host-side random choice (module_dropout > 0, a
    DyLoRA rank block), described, or None: what a CUDA graph cannot replay."""
    for name, layer in network.layers.items():
        if getattr(layer.algorithm, "name", "") == "dylora":
            return f"DyLoRA (layer {name})"
        if float(layer.opts.get("module_dropout", 0) or 0) > 0:
            return f"module_dropout > 0 (layer {name})"
    return None


class Trainer:
    """``Trainer(cfg).train()``. ``pipeline=`` uses an already loaded pipeline (tests, notebooks)
    instead of ``[model] path``; ``callbacks`` are called as ``cb(trainer, event, **info)`` with
    events ``step`` (after every optimizer step), ``checkpoint``, ``epoch``."""

    def __init__(self, cfg: Config, *, pipeline=None, resume: str | None = None,
                 callbacks: Sequence[Callable] = (), accelerator=None):
        self.cfg = cfg
        self._pipe_arg = pipeline
        self.resume_from = resume
        self.callbacks = list(callbacks)
        self._accelerator = accelerator
        self.result: TrainResult | None = None
        self.losses: list[tuple[int, float]] = []
        self.eval_losses: list[tuple[int, float]] = []
        self.grad_norms: list[tuple[int, float]] = []
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.config_path: str | None = None
        self._shards: LocalShards | None = None  # FSDP: the optimizer's local view of the shards
        self._grad_sync: FlatGradSync | None = None  # ddp_comm = "flat"
        #: whether the steps are replayed as CUDA graphs (``[train] cuda_graph`` resolved in setup) and why
        self.cuda_graph: bool | None = None
        self.cuda_graph_reason = ""
        self._setup_done = False

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        if self._setup_done:
            return self
        cfg = self.cfg
        if self._pipe_arg is None:
            check_runnable(cfg)
        elif not cfg.data.train_dir:
            raise ConfigError("no training images: set [data] train_dir (or --train-dir)")
        self._make_accelerator()
        cfg = self.cfg  # `accelerate launch --use_fsdp` may have set [distributed] strategy
        acc = self.accelerator
        self._graph_cls = None
        self.cuda_graph, self.cuda_graph_reason = resolve_cuda_graph(cfg, acc.device.type)
        if self.cuda_graph:  # checked before any model is loaded
            from . import graphs
            self._graph_cls = graphs.GraphedStep  # looked up at run time: the CPU tests put a stand-in there
            if acc.device.type != "cuda" and not self._graph_cls.runs_without_cuda:  # only cuda_graph = true
                raise ConfigError(f"[train] cuda_graph = true needs a CUDA GPU; this run is on {acc.device} "
                                  f"(set cuda_graph = false, or leave it \"auto\")")
        self.session_id = random.SystemRandom().randint(0, 2**31 - 1)
        self.started_at = time.time()
        if acc.is_main_process:
            os.makedirs(cfg.output.output_dir, exist_ok=True)
            self._clean_stale_temps()
        acc.wait_for_everyone()
        self._check_outputs()
        self._seed_everything(cfg.train.seed)

        # model
        pipe = self._pipe_arg if self._pipe_arg is not None else load_base_pipeline(cfg)
        self.pipe = pipe
        self.family = pipeline_family(pipe, cfg.model.family)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            m = getattr(pipe, name, None)
            if m is not None:
                m.requires_grad_(False)
                m.eval()
        sched_cfg = dict(pipe.scheduler.config)
        pt = cfg.model.prediction_type or sched_cfg.get("prediction_type", "epsilon")
        if pt not in ("epsilon", "v_prediction"):
            raise ConfigError(f"the model's scheduler predicts {pt!r}; lyco trains epsilon or v_prediction "
                              f"(set [model] prediction_type)")
        self.prediction_type = pt
        from diffusers import DDPMScheduler
        self.noise_scheduler = DDPMScheduler.from_config(
            sched_cfg, prediction_type=pt, rescale_betas_zero_snr=cfg.train.zero_terminal_snr)
        if cfg.train.zero_terminal_snr and pt == "epsilon":
            log.warning("zero_terminal_snr with epsilon prediction: the last timestep carries no signal; "
                        "v_prediction is recommended")
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(torch.float32)
        n_t = len(self.alphas_cumprod)
        self.t_min = cfg.train.min_timestep
        self.t_max = cfg.train.max_timestep or n_t
        if self.t_max > n_t:
            raise ConfigError(f"[train] max_timestep {self.t_max} exceeds the schedule's {n_t} timesteps")

        # network
        self._build_network()
        if self.cuda_graph:  # a preset file's overrides can ask for what the config check cannot see
            why = _host_decided_layer(self.network)
            if why and cfg.train.cuda_graph is True:
                raise ConfigError(f"[train] cuda_graph = true is not supported with {why} (decided on the host "
                                  f"every step; a CUDA graph would replay one choice forever); set cuda_graph = "
                                  f"false")
            if why:
                self.cuda_graph, self.cuda_graph_reason, self._graph_cls = False, f"auto: {why}", None
        if acc.is_main_process:
            log.info("cuda_graph: %s (%s)", "on" if self.cuda_graph else "off", self.cuda_graph_reason)

        # precision and placement
        # bf16 without autocast ([train] autocast = false): the accelerator runs without mixed precision, the
        # model is still cast to bf16 and computes in it
        mp = "bf16" if self._bf16_plain() else acc.mixed_precision
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
        dev = acc.device
        pipe.unet.to(dev, dtype=self.weight_dtype)
        for name in ("text_encoder", "text_encoder_2"):
            m = getattr(pipe, name, None)
            if m is not None:
                m.to(dev, dtype=self.weight_dtype)
        pipe.vae.to(dev, dtype=torch.float32)
        self.network.to(dev)
        if cfg.train.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            pipe.unet.train()
            if self.train_te:
                for te in self.text.encoders:
                    te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                    te.train()

        # data
        self._build_data()

        # optimizer, schedule
        groups = self._param_groups()
        in_groups = {id(p) for g in groups for p in g["params"]}
        for p in self.network.parameters():
            if id(p) not in in_groups:
                p.requires_grad_(False)
        if not groups:
            raise ConfigError("no parameter has a learning rate > 0: nothing to train")
        strategy = self.strategy
        self.conv_layout = None
        want = cfg.train.conv_weights_channels_last
        if want is True and strategy == "fsdp":
            raise ConfigError("[train] conv_weights_channels_last = true does not work with FSDP (its flat "
                              "parameters have no conv layout); set it to \"auto\" or false")
        if want is True or (want == "auto" and strategy != "fsdp" and layout.wanted(dev, self.weight_dtype)):
            # decided per conv in the first forward — the first step's, an eager warm-up call where graphs are on
            self.conv_layout = layout.frozen_conv_weights_channels_last(pipe.unet)
        self.model = TrainingModule(self.network, pipe.unet, self.text, register_unet=strategy == "fsdp")
        self._shards = None
        if strategy == "fsdp":
            fsdp_shard(self.model, pipe.unet, self.network, device=dev,
                       reshard_after_forward=cfg.distributed.fsdp_reshard_after_forward)
            groups = self._param_groups()  # the same groups, now of the sharded parameters …
            self._shards = LocalShards([p for g in groups for p in g["params"]])
            groups = [{**g, "params": [self._shards.local_of(p) for p in g["params"]]} for g in groups]  # … local
        self.optimizer = make_optimizer(cfg, groups, flat_ok=strategy != "fsdp")
        self.total_steps = self._count_total_steps()
        w = cfg.optimizer.lr_warmup_steps
        warm = int(w * self.total_steps) if 0 < w < 1 else int(w)
        self.warmup_steps = warm
        kind = cfg.optimizer.lr_scheduler
        if kind == "constant" and warm:
            kind = "constant_with_warmup"
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(kind, warm, self.total_steps, cfg.optimizer.lr_scheduler_num_cycles))

        # accelerate: DDP wraps the module (one process: nothing to wrap); "flat" and FSDP synchronise
        # themselves, so accelerate only prepares the optimizer and shards the data loader
        self._grad_sync = None
        if strategy in ("single", "ddp"):
            self.model, self.optimizer, self.dataloader = acc.prepare(self.model, self.optimizer, self.dataloader)
            # prepare moves the model (model.to(device)); on a CPU run of several processes that copies every
            # parameter (torch's .to("cpu:0")): give FlatAdamW's buffer back to them before anything captures them
            readopt = getattr(self._inner_optimizer(), "readopt", None)
            if readopt is not None:
                readopt()
            if strategy == "ddp":
                register_ddp_hook(self.model)
        else:
            self.optimizer, self.dataloader = acc.prepare(self.optimizer, self.dataloader)
            if strategy == "flat":
                self._grad_sync = FlatGradSync(list(self.network.parameters()))
                self._grad_sync.broadcast_parameters()
        # DDP keeps gradients in its buckets (gradient_as_bucket_view): zero them rather than dropping
        # them, unless some parameters may go unused in a step (their gradient must stay None then, as
        # on one GPU, or the optimizer would decay them)
        self._grads_to_none = not (strategy == "ddp" and not self._find_unused)
        self._graph = None
        if self._graph_cls is not None:
            self._graph = self._graph_cls(self._graph_fn, list(self.network.parameters()))
            self._grads_to_none = False  # the graph accumulates into the same gradient tensors every step
            if self._grad_sync is not None:  # several processes: gradients in flat buffers, all-reduced in place
                self._graph.ensure_grads()
                self._grad_sync.adopt(self._graph.flat_grads)
        self._eval_batch = None
        if self.resume_from:
            self.load_state(self.resume_from)
        self._setup_done = True
        return self

    def _param_groups(self) -> list[dict]:
        o = self.cfg.optimizer
        return self.network.param_groups(o.learning_rate, unet_lr=o.unet_lr, te_lr=o.text_encoder_lr,
                                         loraplus_ratio=o.loraplus_ratio)

    @property
    def strategy(self) -> str:
        """How the processes share the work: ``single`` (one process), ``ddp`` (DDP buckets), ``flat``
        (DDP semantics, one flat all-reduce per step) or ``fsdp``."""
        if self.accelerator.num_processes == 1:
            return "single"
        d = self.cfg.distributed
        if d.strategy == "fsdp":
            return "fsdp"
        # with CUDA graphs DDP's per-bucket hooks would fire inside the captured backward: average the
        # gradients after the replay instead, with one all-reduce
        graph = self.cuda_graph
        if graph is None:  # before setup: resolved from the config and the accelerator's device
            dev = getattr(self.accelerator, "device", None)
            graph = resolve_cuda_graph(self.cfg, getattr(dev, "type", "cpu"))[0]
        return "flat" if d.ddp_comm == "flat" or graph else "ddp"

    def _sharded_model(self):
        return self.model if self.strategy == "fsdp" else None

    def _clean_stale_temps(self) -> None:
        """Remove the temporary files/folders a killed run of this output name left behind (an
        interrupted write never replaces a finished file, but its temporary stays)."""
        name = self.cfg.output.output_name
        for p in Path(self.cfg.output.output_dir).iterdir():
            n = p.name
            if (n.startswith("." + name) and n.endswith(".tmp")) or (n.startswith(name) and ".old-" in n):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()

    def _make_accelerator(self):
        # module dropout and DyLoRA leave parameters unused in some steps: DDP must look for them
        opts = self.cfg.network.options
        self._find_unused = any(float(opts.get(k, 0) or 0) > 0 for k in ("module_dropout",)) or \
            self.cfg.network.algo == "dylora"
        if self._accelerator is not None:
            self.accelerator = self._accelerator
            return
        from accelerate import Accelerator, DataLoaderConfiguration
        from accelerate.utils import DistributedDataParallelKwargs
        cfg = self.cfg
        log_with = cfg.output.log_with
        if log_with == "auto":
            try:
                import tensorboard  # noqa: F401
                log_with = "tensorboard"
            except ImportError:
                log_with = "none"
        elif log_with == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError("[output] log_with = 'tensorboard' but tensorboard is not installed "
                                  "(pip install tensorboard, or log_with = 'none')") from None
        self.log_with = log_with
        # `accelerate launch --use_fsdp` asks for FSDP through the environment. lyco shards the model
        # itself (fsdp_shard: the adapter must share units with the base layers it sits on, which
        # accelerate's wrapping policies cannot express), so the flag becomes [distributed] strategy
        # and accelerate itself runs plain multi-process.
        if os.environ.pop("ACCELERATE_USE_FSDP", "false").lower() == "true" and cfg.distributed.strategy != "fsdp":
            self.cfg = cfg = cfg.replace(distributed={"strategy": "fsdp"})
        handlers = [DistributedDataParallelKwargs(**ddp_kwargs(cfg.distributed, self._find_unused))]
        mp = "no" if self._bf16_plain() else cfg.train.mixed_precision
        # accelerate keeps one global state per process; a second Trainer in the same single process
        # (tests, notebooks) may want another precision or accumulation: start from a clean state.
        from accelerate.state import AcceleratorState, GradientState, PartialState
        if AcceleratorState._shared_state and PartialState().num_processes == 1:
            AcceleratorState._reset_state(reset_partial_state=False)
            GradientState._reset_state()
        try:
            self.accelerator = Accelerator(
                gradient_accumulation_steps=cfg.train.gradient_accumulation_steps, mixed_precision=mp,
                log_with=None if log_with == "none" else log_with, project_dir=cfg.logging_dir,
                kwargs_handlers=handlers, cpu=cfg.train.cpu,
                # the batches' copies to the device without waiting for it: a blocking copy waits for all the work
                # queued before it, which the step-ahead loop (Trainer._step_ahead) keeps a step's worth of
                dataloader_config=DataLoaderConfiguration(non_blocking=True))
        except ValueError as e:
            raise ConfigError(f"[train] mixed_precision = {mp!r}: {e}") from None

    def _seed_everything(self, seed: int):
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            import numpy as np
            np.random.seed(seed % 2**32)
        except ImportError:  # pragma: no cover
            pass

    def _check_outputs(self):
        out, name = self.cfg.output.output_dir, self.cfg.output.output_name
        if self.cfg.output.overwrite or self.resume_from:
            return
        final = os.path.join(out, f"{name}.safetensors")
        if os.path.exists(final):
            raise ConfigError(f"{final} already exists; use another output_name, --overwrite, or "
                              f"--resume a state of that run")

    def _build_network(self):
        self.network, self.train_te = build_network(self.pipe, self.cfg, self.family)
        self.text = TextEncoding(self.pipe, self.family, self.cfg.model.clip_skip)

    def close(self) -> None:
        """Take the adapter off the pipeline (the pipeline is as it was, apart from dtype/device)."""
        net = getattr(self, "network", None)
        if net is not None and net.attached:
            net.detach()

    def _build_data(self):
        cfg, d, acc = self.cfg, self.cfg.data, self.accelerator
        subsets = data_mod.scan(d.train_dir, repeats=d.repeats, caption_extension=d.caption_extension)
        reg = data_mod.scan(d.reg_dir, repeats=1, caption_extension=d.caption_extension, is_reg=True,
                            what="reg_dir") if d.reg_dir else []
        self.subsets, self.reg_subsets = subsets, reg
        items = [it for s in subsets + reg for it in s.items]
        self.items = items
        res = cfg.resolution
        self.buckets = data_mod.assign_buckets(items, res, enable=d.enable_bucket, min_reso=d.min_bucket_reso,
                                               max_reso=d.max_bucket_reso, step=d.bucket_reso_steps,
                                               no_upscale=d.bucket_no_upscale)
        mult = self._size_multiple()
        bad = [b for b in self.buckets if b[0] % mult or b[1] % mult]
        if bad:
            raise ConfigError(f"[data] image size(s) {bad} are not multiples of {mult}, which this model needs "
                              f"(VAE × UNet downsampling); use a resolution and bucket_reso_steps that are "
                              f"multiples of {mult}")
        self.cache = None
        if d.cache_latents:
            self.cache = data_mod.LatentCache(cfg.cache_dir, self.pipe.vae)
            t0 = time.time()
            with acc.main_process_first():
                for it in items:
                    self.cache.ensure(it, d.flip_aug)
            if acc.is_main_process:
                log.info("latents: %d encoded, %d from the cache %s (%.1fs)", self.cache.encoded,
                         self.cache.hits, self.cache.folder, time.time() - t0)
        caps = data_mod.CaptionOptions(d.trigger_word, d.shuffle_caption, d.keep_tokens, d.caption_separator,
                                       d.caption_tag_dropout_rate, d.caption_dropout_rate,
                                       d.caption_dropout_every_n_epochs)
        self.dataset = data_mod.TrainDataset(items, seed=cfg.train.seed, captions=caps, flip_aug=d.flip_aug,
                                             cache=self.cache)
        self.sampler = data_mod.BucketBatchSampler(items, cfg.train.batch_size, cfg.train.seed,
                                                   num_replicas=acc.num_processes)
        self.dataloader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler,
                                                      collate_fn=data_mod.collate, num_workers=d.num_workers,
                                                      pin_memory=self._pin_batches())

    def _bf16_plain(self) -> bool:
        """bf16 without autocast (``[train] autocast = false``): the bf16 model and its activations as they are.
        Under autocast the norms run in fp32 with casts around them and every product casts its operands: on an
        H100, SD1.5-sized LoRA as a CUDA graph, ≈ 2000 cast kernels (≈ 10 ms) of the step's 93 ms (run 116)."""
        t = self.cfg.train
        return t.mixed_precision == "bf16" and not t.autocast

    def _pin_batches(self) -> bool:
        """Batches in page-locked memory where they go to a CUDA device: their copies there then run asynchronously
        (the accelerator's non_blocking data loader)."""
        return not self.cfg.train.cpu and getattr(self.accelerator.device, "type", "cpu") == "cuda"

    def _size_multiple(self) -> int:
        vae_f = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        unet_f = 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)
        return vae_f * unet_f

    def _batches_per_process(self, epoch: int) -> int:
        return len(self.sampler.batches(epoch)) // self.accelerator.num_processes

    def steps_in_epoch(self, epoch: int) -> int:
        return math.ceil(self._batches_per_process(epoch) / self.cfg.train.gradient_accumulation_steps)

    def _count_total_steps(self) -> int:
        t = self.cfg.train
        if t.max_train_steps:
            return t.max_train_steps
        return sum(self.steps_in_epoch(e) for e in range(t.max_train_epochs))

    # ------------------------------------------------------------------ the objective
    def _latents_of(self, batch) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].to(self.accelerator.device, torch.float32, non_blocking=True)
        lats = [data_mod.encode_latent(self.pipe.vae, px, sha, flip)
                for px, sha, flip in zip(batch["pixels"], batch["sha256"], batch["flip"])]
        return torch.stack(lats).to(self.accelerator.device, non_blocking=True)

    def _text_inputs(self, captions):
        if not self.train_te and self.cfg.data.cache_text_encoder_outputs:
            with self.accelerator.autocast():
                h, p = self.text.encode_cached(captions)
            return {"hidden": h, "pooled": p}
        if not self.train_te:
            with torch.no_grad(), self.accelerator.autocast():
                h, p = self.text.encode(self.text.tokenize(captions))
            return {"hidden": h, "pooled": p}
        return {"input_ids": [x.to(self.accelerator.device, non_blocking=True) for x in self.text.tokenize(captions)]}

    def _noise(self, latents: torch.Tensor, gen: torch.Generator, timesteps=None):
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=gen)
        if self.cfg.train.noise_offset:
            noise = noise + self.cfg.train.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=gen)
        if timesteps is None:
            timesteps = torch.randint(self.t_min, self.t_max, (b,), generator=gen)
        # non_blocking: a blocking copy to the device waits for everything queued before it — with the step-ahead
        # loop (Trainer._step_ahead) the previous step's whole graph (run 115: 7 such waits per step); from pageable
        # memory the copy is staged at once, so the CPU tensors may go right after
        return noise.to(latents.device, non_blocking=True), timesteps.to(latents.device, non_blocking=True)

    def _target(self, latents, noise, timesteps):
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def _weights(self, timesteps: torch.Tensor, is_reg: torch.Tensor | None) -> torch.Tensor:
        w = torch.ones(timesteps.shape[0], device=timesteps.device)
        g = self.cfg.train.min_snr_gamma
        if g:
            ac = self.alphas_cumprod.to(timesteps.device, non_blocking=True)[timesteps]
            snr = (ac / (1 - ac)).clamp_min(1e-8)
            base = snr + 1 if self.prediction_type == "v_prediction" else snr
            w = torch.minimum(snr, torch.full_like(snr, g)) / base
        if is_reg is not None:  # no host-side is_reg.any(): the batch may be on the device already (a wait)
            w = torch.where(is_reg.to(w.device, non_blocking=True), w * self.cfg.data.prior_loss_weight, w)
        return w

    def loss_inputs(self, latents, captions, time_ids, gen, is_reg=None, timesteps=None, noise=None) -> dict:
        """Everything the loss needs, as device tensors (noise, timesteps, per-sample weights, text
        states or token ids): the host-side part of a step, kept apart from :meth:`loss_of` so that
        the latter can be captured as a CUDA graph (``[train] cuda_graph``)."""
        dev = latents.device
        if noise is None:
            noise, timesteps = self._noise(latents, gen, timesteps)
        timesteps = timesteps.to(dev, non_blocking=True)
        return {"latents": latents, "noise": noise.to(dev, non_blocking=True), "timesteps": timesteps,
                "weights": self._weights(timesteps, is_reg),
                "time_ids": time_ids.to(dev, non_blocking=True) if isinstance(time_ids, torch.Tensor) else time_ids,
                "text": self._text_inputs(captions)}

    def loss_of(self, model, inp: dict) -> torch.Tensor:
        """The weighted diffusion loss of one batch from :meth:`loss_inputs` (device work only)."""
        latents, noise, timesteps = inp["latents"], inp["noise"], inp["timesteps"]
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = self._target(latents, noise, timesteps)
        with self.accelerator.autocast():
            pred = model(noisy.to(self.weight_dtype), timesteps, time_ids=inp["time_ids"], **inp["text"])
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.dim())))
        return (loss * inp["weights"]).mean()

    def compute_loss(self, model, latents, captions, time_ids, gen, is_reg=None, timesteps=None,
                     noise=None) -> torch.Tensor:
        return self.loss_of(model, self.loss_inputs(latents, captions, time_ids, gen, is_reg, timesteps, noise))

    def _graph_fn(self, inp: dict) -> torch.Tensor:
        """Forward and backward of one micro-batch: what ``[train] cuda_graph`` captures."""
        with self._step_casts():
            loss = self.loss_of(self.model, inp)
            self.accelerator.backward(loss)
        return loss.detach()

    def _step_casts(self):
        """The adapter's factors cast to the compute dtype once per step and flat buffer, not per layer and direction
        (:func:`lyco.algorithms.casts.step_casts`); with one process or the flat all-reduce, the ops' factor
        gradients added into the parameters' gradients by their GEMMs (its ``grad_sink``: nothing but the optimizer
        reads them; DDP's buckets are filled by per-parameter hooks that would not fire). Not under FSDP: a unit's
        storage is freed after its forward and gathered again for its backward, so an address would not name the
        same factors throughout the step."""
        strategy = self.strategy
        if strategy == "fsdp":
            return contextlib.nullcontext()
        from ..algorithms.casts import step_casts
        return step_casts(grad_sink=strategy in ("single", "flat"))

    # ------------------------------------------------------------------ evaluation
    def eval_batch(self):
        """The fixed evaluation batch: the first ``[eval] num_images`` training images (no
        augmentation, fixed caption), each at every ``[eval] timesteps`` with noise from
        ``[eval] seed``."""
        if self._eval_batch is None:
            e = self.cfg.eval
            train_items = [i for i, it in enumerate(self.items) if not it.is_reg][: e.num_images]
            batch = []
            for k, i in enumerate(train_items):
                item = self.items[i]
                s = self.dataset.sample(i, flip=False, caption=self.dataset.fixed_caption(item))
                lat = s["latents"] if "latents" in s else data_mod.encode_latent(
                    self.pipe.vae, s["pixels"], s["sha256"], False)
                n = len(e.timesteps)
                lat = lat[None].expand(n, *lat.shape).contiguous()
                g = torch.Generator().manual_seed(_seed_of(e.seed, k))
                noise = torch.randn(lat.shape, generator=g)
                ts = torch.tensor([min(t, len(self.alphas_cumprod) - 1) for t in e.timesteps])
                tid = torch.tensor([[*s["original_size"], *s["crop_top_left"], *s["target_size"]]] * n,
                                   dtype=torch.float32)
                batch.append((lat, [s["caption"]] * n, tid, noise, ts))
            self._eval_batch = batch
        return self._eval_batch

    @torch.no_grad()
    def evaluate(self) -> float:
        """Loss of the adapter on the fixed evaluation batch (adapter in eval mode: no dropout)."""
        net = self.network
        was = net.training
        net.eval()
        try:
            dev = self.accelerator.device
            model = self.accelerator.unwrap_model(self.model)
            tot, n = 0.0, 0
            for lat, caps, tid, noise, ts in self.eval_batch():
                lat = lat.to(dev)
                loss = self.compute_loss(model, lat, caps, tid.to(dev), None, noise=noise, timesteps=ts)
                tot += float(loss) * lat.shape[0]
                n += lat.shape[0]
            return tot / max(1, n)
        finally:
            if was:
                net.train()

    # ------------------------------------------------------------------ the loop
    def _position_seed(self, epoch: int, batch: int) -> int:
        """Seed of this process's ``batch``-th micro-batch of ``epoch``. It depends on the micro-batch's
        place in the epoch's *global* list of batches: accelerate deals that list round-robin
        (process r of W takes batches r, r+W, …), so local batch b is global batch b·W + r. The same
        micro-batch therefore draws the same noise whatever the number of processes: W processes with
        gradient accumulation A train exactly what one process with accumulation A·W trains, and a
        state resumes on another number of processes. (The last field was the process index when
        seeds were per process; 0 keeps single-process runs drawing what they drew before.)"""
        acc = self.accelerator
        return _seed_of(self.cfg.train.seed, "step", epoch, batch * acc.num_processes + acc.process_index, 0)

    def train(self) -> TrainResult:
        self.setup()
        cfg, acc = self.cfg, self.accelerator
        t0 = time.time()
        self.result = TrainResult(None, cfg.output.output_dir, 0, 0)
        if acc.is_main_process and self.log_with != "none":
            acc.init_trackers("lyco", config={k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                                              for k, v in cfg.flat_args().items() if v is not None})
        pbar = None
        if acc.is_main_process:  # the effective configuration, to re-run or --resume with
            from .config import commented_toml
            self.config_path = os.path.join(cfg.output.output_dir, f"{cfg.output.output_name}-config.toml")
            _atomic_text(self.config_path, commented_toml(cfg))
        try:
            if cfg.eval.enabled and not self.eval_losses and self.global_step == 0:
                self._record_eval()
            if cfg.sample.at_start and cfg.sample.prompts and self.global_step == 0:
                self._sample("start")
            if acc.is_local_main_process and cfg.output.progress_bar:
                from tqdm.auto import tqdm
                pbar = tqdm(total=self.total_steps, initial=self.global_step, desc="training", dynamic_ncols=True,
                            smoothing=0.1)
            self._loop(pbar)
            self._finish()
        finally:
            if pbar is not None:
                pbar.close()
            if self.log_with != "none":
                with contextlib.suppress(Exception):
                    acc.end_training()
        self.result.steps, self.result.epochs = self.global_step, self.epoch
        self.result.losses, self.result.eval_losses = list(self.losses), list(self.eval_losses)
        self.result.seconds = time.time() - t0
        return self.result

    def _done(self) -> bool:
        return self.global_step >= self.total_steps

    def _loop(self, pbar):
        cfg, acc = self.cfg, self.accelerator
        model, opt = self.model, self.optimizer
        params = [p for p in self.network.parameters() if p.requires_grad]
        fsdp = self.strategy == "fsdp"
        # step-ahead (see _step_ahead): the micro-batches' losses stay on the device, the NaN guard is a device flag
        ahead = self._step_ahead()
        inner = self._inner_optimizer()
        accum_losses: list = []   # each micro-batch's mean loss: floats, or 0-d device tensors when ahead
        accum_all: list = []      # ahead: each micro-batch's losses per process (for the NaN message)
        bad = None                # ahead: "a loss of this optimizer step was not finite", on the device
        self._pending, self._pbar = None, pbar
        while not self._done():
            self.sampler.epoch = self.epoch
            dl = self.dataloader
            if self.batch_in_epoch:
                dl = acc.skip_first_batches(self.dataloader, self.batch_in_epoch)
            for batch in dl:
                seed = self._position_seed(self.epoch, self.batch_in_epoch)
                torch.manual_seed(seed)
                gen = torch.Generator().manual_seed(seed)
                with acc.accumulate(model):
                    latents = self._latents_of(batch)
                    if self._graph is not None:
                        loss = self._graph(self.loss_inputs(latents, batch["captions"], batch["time_ids"], gen,
                                                            is_reg=batch["is_reg"]))
                    else:
                        with self._step_casts():
                            loss = self.compute_loss(model, latents, batch["captions"], batch["time_ids"], gen,
                                                     is_reg=batch["is_reg"])
                            acc.backward(loss)
                    # The NaN/Inf check reads the loss on the host, which waits for the device. It
                    # comes after the backward pass (still before the update), so that forward and
                    # backward are queued in one go instead of the device idling in between.
                    all_losses = acc.gather(loss.detach().float().reshape(1))
                    if ahead:
                        nonfinite = ~torch.isfinite(all_losses).all()
                        bad = nonfinite if bad is None else bad | nonfinite
                        # the previous optimizer step's loss and grad norm, read now that this step's forward and
                        # backward are queued: the host waits for that step, the device has this one to run
                        self._settle()
                    elif not bool(torch.isfinite(all_losses).all()):
                        self._diverged([float(x) for x in all_losses.flatten()], self.global_step + 1)
                    grad_norm = None
                    if acc.sync_gradients:
                        if self._grad_sync is not None:
                            self._grad_sync.sync()
                        if fsdp:
                            grad_norm = clip_grad_norm(params, cfg.optimizer.max_grad_norm)
                            self._shards.grads_to_local()
                        elif cfg.optimizer.max_grad_norm > 0:
                            grad_norm = acc.clip_grad_norm_(params, cfg.optimizer.max_grad_norm)
                        else:
                            acc.unscale_gradients()
                            grad_norm = torch.nn.utils.get_total_norm(
                                [p.grad for p in params if p.grad is not None])
                    if ahead and acc.sync_gradients:
                        # a non-finite loss leaves the adapter and the optimizer state untouched, decided on the
                        # device (FlatAdamW.found_inf); the host learns of it at the next step and stops there
                        inner.found_inf = bad.float()
                    try:
                        opt.step()
                    finally:
                        if ahead:
                            inner.found_inf = None
                    opt.zero_grad(set_to_none=self._grads_to_none)
                    if fsdp and acc.sync_gradients:
                        self._shards.zero_grad()
                if ahead:
                    accum_losses.append(all_losses.mean())
                    accum_all.append(all_losses.reshape(-1))
                else:
                    accum_losses.append(float(all_losses.mean()))
                self.batch_in_epoch += 1
                if not acc.sync_gradients:
                    continue
                self.lr_scheduler.step()
                self.global_step += 1
                lrs = self.lr_scheduler.get_last_lr()
                e, s, o = cfg.eval, cfg.sample, cfg.output
                due_eval = bool(e.enabled and e.every_n_steps and self.global_step % e.every_n_steps == 0)
                due_sample = bool(s.prompts and s.every_n_steps and self.global_step % s.every_n_steps == 0)
                due_save = bool(o.save_every_n_steps and self.global_step % o.save_every_n_steps == 0
                                and not self._done())
                if ahead:
                    self._queue_results(accum_losses, accum_all, grad_norm, bad, lrs)
                    accum_losses, accum_all, bad = [], [], None
                    if due_eval or due_sample or due_save or self._done():
                        self._settle()  # what happens at a step's end needs the step checked first
                else:
                    step_loss = sum(accum_losses) / len(accum_losses)
                    accum_losses = []
                    gn = float(grad_norm) if grad_norm is not None else float("nan")
                    self._step_done(pbar, self.global_step, step_loss, gn, lrs)
                if due_eval:
                    self._record_eval()
                if due_sample:
                    self._sample(f"step{self.global_step:08d}")
                if due_save:
                    self.save_checkpoint(f"{o.output_name}-step{self.global_step:08d}")
                if self._done():
                    break
            else:
                # the epoch ran to its end
                self._settle()
                self.epoch += 1
                self.batch_in_epoch = 0
                self._emit("epoch", epoch=self.epoch, step=self.global_step)
                o = cfg.output
                if o.save_every_n_epochs and self.epoch % o.save_every_n_epochs == 0 and not self._done():
                    self.save_checkpoint(f"{o.output_name}-{self.epoch:06d}")
                continue
            # stopped inside the epoch (max_train_steps reached)
            if self.batch_in_epoch >= self._batches_per_process(self.epoch):
                self.epoch += 1
                self.batch_in_epoch = 0
        self._settle()  # (the last step settled at its end already)

    def _step_ahead(self) -> bool:
        """Whether the loop runs one optimizer step ahead of the host: it never waits for the device within a step
        (each wait drains the queue, and the device then idles while the host loads the next batch and launches
        its work — on an H100, SD1.5 b8 as a CUDA graph, 16.8 of 122.6 ms per step, run 114, where the graph's
        launch alone took 12.2 ms of host time): the NaN guard is a device flag that makes the update a no-op (``FlatAdamW.found_inf``, torch's
        fused AdamW kernel), and a step's loss and gradient norm are read at the next step
        (:meth:`_queue_results`, :meth:`_settle`) — or at once where the step's end writes, evaluates or samples.
        Needs FlatAdamW on fused kernels; not with fp16's loss scaler (it reads the device itself) or FSDP."""
        from ..optim import FlatAdamW
        inner = self._inner_optimizer()
        return (isinstance(inner, FlatAdamW) and inner.skips_on_found_inf and self.strategy != "fsdp"
                and getattr(self.accelerator, "scaler", None) is None)

    def _queue_results(self, losses, per_process, grad_norm, bad, lrs) -> None:
        """Step-ahead: this optimizer step's loss(es), gradient norm and NaN flag copied to the host without
        waiting (pinned memory, an event), read by :meth:`_settle`."""
        dev = losses[0].device
        gn = grad_norm.reshape(()).float() if grad_norm is not None else torch.full((), float("nan"), device=dev)
        vals = torch.cat([torch.stack(losses), torch.cat(per_process), gn.reshape(1), bad.float().reshape(1)])
        ev = None
        if vals.is_cuda:
            host = torch.empty(vals.shape, dtype=vals.dtype, pin_memory=True)
            host.copy_(vals, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            vals = host
        self._pending = (self.global_step, len(losses), vals, ev, list(lrs))

    def _settle(self) -> None:
        """Step-ahead: the queued step's results (:meth:`_queue_results`): stop if its loss was not finite (its
        update was skipped on the device), else record, log and announce it as the synchronous loop does."""
        p, self._pending = self._pending, None
        if p is None:
            return
        step, n, vals, ev, lrs = p
        if ev is not None:
            ev.synchronize()
        v = vals.tolist()
        if v[-1]:
            self._diverged(v[n:-2], step)
        self._step_done(self._pbar, step, sum(v[:n]) / n, v[-2], lrs)

    def _step_done(self, pbar, step: int, step_loss: float, gn: float, lrs: list) -> None:
        """An optimizer step's loss and gradient norm: recorded, shown, logged, announced (``step`` event)."""
        acc = self.accelerator
        self.losses.append((step, step_loss))
        self.grad_norms.append((step, gn))
        lr = lrs[0]
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", epoch=self.epoch + 1)
        if self.log_with != "none":
            logs = {"loss/train": step_loss, "grad_norm": gn}
            for g, l in zip(self.optimizer.param_groups, lrs):
                logs[f"lr/{g.get('name', 'group')}"] = l
            acc.log(logs, step=step)
        self._emit("step", step=step, loss=step_loss, lr=lr)

    def _kept_note(self) -> str:
        """What a stopped run leaves behind, for its error message."""
        last = self.result.checkpoints[-1] if self.result and self.result.checkpoints else None
        if last:
            return f"the last good checkpoint is {last}"
        if self.resume_from:
            return f"nothing was written since resuming from {self.resume_from}"
        return "no checkpoint had been written yet"

    def _diverged(self, bad: list[float], step: int):
        raise TrainingError(
            f"loss became {'NaN' if any(math.isnan(x) for x in bad) else 'Inf'} at step {step} "
            f"(epoch {self.epoch + 1}, losses per process {bad}); the run is stopped and nothing more is "
            f"written: {self._kept_note()}. {_DIVERGED_ADVICE}")

    def _record_eval(self):
        v = self.evaluate()
        self.eval_losses.append((self.global_step, v))
        if self.log_with != "none":
            self.accelerator.log({"loss/eval": v}, step=self.global_step)
        if self.accelerator.is_main_process:
            log.info("step %d: fixed-batch eval loss %.5f", self.global_step, v)

    def _emit(self, event: str, **info):
        for cb in self.callbacks:
            cb(self, event, **info)

    # ------------------------------------------------------------------ outputs
    def metadata(self) -> dict[str, str]:
        """The ``ss_*`` / ``modelspec.*`` metadata of a checkpoint written now."""
        from ..formats import metadata as M
        cfg, n, d, o, t, acc = (self.cfg, self.cfg.network, self.cfg.data, self.cfg.optimizer, self.cfg.train,
                                self.accelerator)
        if not hasattr(self, "_model_hashes"):
            self._model_hashes = base_model_hashes(cfg.model.path) if acc.is_main_process else ("", "")
        alpha = float(n.alpha if n.alpha is not None else n.rank)
        net_args: dict[str, Any] = {"algo": n.algo, "preset": n.preset}
        if n.conv_rank is not None:
            net_args["conv_dim"] = n.conv_rank
        if n.conv_alpha is not None:
            net_args["conv_alpha"] = n.conv_alpha
        if n.dora:
            net_args["dora_wd"] = True
            net_args["wd_on_output"] = n.dora_axis == "out"
        net_args.update(n.options)
        res = cfg.resolution
        ts = self.started_at
        oc = cfg.output
        extra = {key: val for key, val in (("author", oc.metadata_author), ("description", oc.metadata_description),
                                           ("license", oc.metadata_license), ("tags", oc.metadata_tags)) if val}
        if d.trigger_word:
            extra["trigger_phrase"] = d.trigger_word
        if not hasattr(self, "_network_module"):
            # networks.lora when every module is plain LoRA/LoCon (kohya's own loader reads those)
            info = getattr(M, "network_info", None)
            self._network_module = info(self.network.to_adapter())["network_module"] if info else "lycoris.kohya"
        md = M.build_minimum_metadata(
            family=self.family, dim=n.rank, alpha=alpha, network_module=self._network_module, network_args=net_args,
            v_pred=self.prediction_type == "v_prediction", output_name=cfg.output.output_name,
            title=cfg.output.metadata_title or cfg.output.output_name, resolution=res, timestamp=ts,
            extra_modelspec=extra)
        n_train = sum(it.repeats for it in self.items if not it.is_reg)
        n_reg = sum(it.repeats for it in self.items if it.is_reg)
        bpe = self._batches_per_process(0)
        # FlatAdamW is torch's AdamW run on flat buffers — the same update element for element — so the file names
        # torch's class: the recipe, as kohya's ss_optimizer records it, not how its launches were grouped (and the
        # same text whichever [distributed] strategy trained it)
        from ..optim import FlatAdamW
        ocls = torch.optim.AdamW if isinstance(self._inner_optimizer(), FlatAdamW) else type(self._inner_optimizer())
        optimizer_desc = f"{ocls.__module__}.{ocls.__name__}(" + \
            ",".join(f"{k}={v}" for k, v in [("weight_decay", o.weight_decay), ("betas", tuple(o.betas)),
                                             *o.args.items()]) + ")"
        ss = {
            "ss_session_id": self.session_id,
            "ss_training_started_at": ts,
            "ss_training_finished_at": time.time(),
            "ss_output_name": cfg.output.output_name,
            "ss_learning_rate": o.learning_rate,
            "ss_text_encoder_lr": o.text_encoder_lr if o.text_encoder_lr is not None else o.learning_rate,
            "ss_unet_lr": o.unet_lr if o.unet_lr is not None else o.learning_rate,
            "ss_num_train_images": n_train,
            "ss_num_reg_images": n_reg,
            "ss_num_batches_per_epoch": bpe,
            "ss_num_epochs": max(self.epoch, 1) if t.max_train_steps else t.max_train_epochs,
            "ss_epoch": self.epoch,
            "ss_steps": self.global_step,
            "ss_max_train_steps": self.total_steps,
            "ss_batch_size_per_device": t.batch_size,
            "ss_total_batch_size": t.batch_size * acc.num_processes * t.gradient_accumulation_steps,
            "ss_gradient_accumulation_steps": t.gradient_accumulation_steps,
            "ss_gradient_checkpointing": t.gradient_checkpointing,
            "ss_lr_scheduler": o.lr_scheduler,
            "ss_lr_warmup_steps": self.warmup_steps,
            "ss_optimizer": optimizer_desc,
            "ss_max_grad_norm": o.max_grad_norm,
            "ss_loraplus_ratio": o.loraplus_ratio,
            "ss_network_dropout": n.options.get("dropout"),
            "ss_mixed_precision": t.mixed_precision,
            "ss_full_fp16": False,
            "ss_cache_latents": d.cache_latents,
            "ss_seed": t.seed,
            "ss_clip_skip": cfg.model.clip_skip if self.family != "sdxl" else None,
            "ss_max_token_length": None,
            "ss_resolution": f"({res[0]}, {res[1]})",
            "ss_enable_bucket": d.enable_bucket,
            "ss_min_bucket_reso": d.min_bucket_reso,
            "ss_max_bucket_reso": d.max_bucket_reso,
            "ss_bucket_no_upscale": d.bucket_no_upscale,
            "ss_bucket_info": json.dumps(data_mod.bucket_info(self.items)),
            "ss_flip_aug": d.flip_aug,
            "ss_color_aug": False,
            "ss_random_crop": False,
            "ss_shuffle_caption": d.shuffle_caption,
            "ss_keep_tokens": d.keep_tokens,
            "ss_caption_dropout_rate": d.caption_dropout_rate,
            "ss_caption_dropout_every_n_epochs": d.caption_dropout_every_n_epochs,
            "ss_caption_tag_dropout_rate": d.caption_tag_dropout_rate,
            "ss_noise_offset": t.noise_offset or None,
            "ss_zero_terminal_snr": t.zero_terminal_snr,
            "ss_min_snr_gamma": t.min_snr_gamma or None,
            "ss_prior_loss_weight": d.prior_loss_weight,
            "ss_loss_type": "l2",
            "ss_sd_model_name": os.path.basename(cfg.model.path.rstrip("/\\")) if cfg.model.path else "",
            "ss_sd_model_hash": self._model_hashes[0],
            "ss_new_sd_model_hash": self._model_hashes[1],
            "ss_tag_frequency": json.dumps(data_mod.tag_frequency(self.subsets, d.caption_separator)),
            "ss_dataset_dirs": json.dumps(data_mod.dataset_dirs(self.subsets)),
            "ss_reg_dataset_dirs": json.dumps(data_mod.dataset_dirs(self.reg_subsets)),
            "ss_datasets": json.dumps([{
                "is_dreambooth": True, "batch_size_per_device": t.batch_size, "num_train_images": n_train,
                "num_reg_images": n_reg, "resolution": list(res), "enable_bucket": d.enable_bucket,
                "min_bucket_reso": d.min_bucket_reso, "max_bucket_reso": d.max_bucket_reso,
                "tag_frequency": data_mod.tag_frequency(self.subsets, d.caption_separator),
                "bucket_info": data_mod.bucket_info(self.items),
                "subsets": [{"img_count": len(s.items), "num_repeats": s.repeats,
                             "image_dir": os.path.basename(s.folder.rstrip("/\\")), "class_tokens": s.class_name,
                             "is_reg": s.is_reg, "shuffle_caption": d.shuffle_caption,
                             "keep_tokens": d.keep_tokens, "flip_aug": d.flip_aug}
                            for s in self.subsets + self.reg_subsets],
            }]),
            "ss_training_comment": cfg.output.training_comment or None,
        }
        md.update({k: str(v) for k, v in ss.items()})
        md["lyco_train_config"] = json.dumps(self._public_config())
        return md

    def _public_config(self) -> dict:
        """The config with absolute paths reduced to their last component (no private paths in files)."""
        d = self.cfg.to_dict()
        for sec, keys in (("model", ("path",)), ("data", ("train_dir", "reg_dir", "cache_dir")),
                          ("output", ("output_dir", "logging_dir"))):
            for k in keys:
                v = d[sec].get(k)
                if v and not str(v).startswith("tiny:"):
                    d[sec][k] = os.path.basename(str(v).rstrip("/\\"))
        return d

    def _inner_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _optimizer_params(self) -> list[torch.Tensor]:
        """The optimizer's parameters in the order torch numbers its state (``state_dict()['state']``)."""
        return [p for g in self._inner_optimizer().param_groups for p in g["params"]]

    def save_checkpoint(self, stem: str, *, final: bool = False) -> str:
        """Adapter (atomic, full metadata), its sample grid, and a resumable state; main process only
        writes, every process waits."""
        cfg, acc = self.cfg, self.accelerator
        out = cfg.output.output_dir
        path = os.path.join(out, f"{stem}.safetensors")
        # FSDP: every process takes part in gathering the full adapter; the main process then writes
        # it with the same code (and so the same keys, shapes and metadata) as a single process
        with gathered(self._sharded_model()):
            net = acc.unwrap_model(self.model).network
            # every process checks (the same values: replicated, or gathered under FSDP), so all of them stop together.
            # A NaN can enter with the last optimizer step, after the last loss was read (run 272, H100: a graph run's
            # loss finite to the end and its saved text-encoder factors NaN), and the loss check never sees it
            named = list(net.named_parameters())
            finite = torch.stack([torch.isfinite(p).all() for _, p in named]).cpu() if named else None  # one sync
            if finite is not None and not bool(finite.all()):
                bad = named[int((~finite).nonzero()[0])][0]
                raise TrainingError(f"the adapter's {bad} is not finite (NaN/Inf) at step {self.global_step}: {path} "
                                    f"is not written; {self._kept_note()}. {_DIVERGED_ADVICE}")
            if acc.is_main_process:
                md = self.metadata()
                net.save(path, dtype=cfg.output.save_dtype, metadata=md, overwrite=True)
                self.result.checkpoints.append(path)
                log.info("saved %s", path)
        if cfg.sample.prompts:
            self._sample(stem)
        if cfg.output.save_state:
            st = self.save_state(os.path.join(out, f"{stem}-state"))
            if acc.is_main_process:
                self.result.states.append(st)
        if acc.is_main_process and not final:
            self._prune()
        acc.wait_for_everyone()
        self._emit("checkpoint", path=path, step=self.global_step)
        return path

    def _prune(self):
        k = self.cfg.output.keep_last_n_checkpoints
        if not k:
            return
        ckpts = self.result.checkpoints
        while len(ckpts) > k:
            old = ckpts.pop(0)
            with contextlib.suppress(OSError):
                os.remove(old)
            stem = old[: -len(".safetensors")]
            shutil.rmtree(stem + "-state", ignore_errors=True)
            with contextlib.suppress(OSError):
                os.remove(stem + "-samples.png")
            if stem + "-state" in self.result.states:
                self.result.states.remove(stem + "-state")

    def _sample(self, stem: str):
        cfg, acc = self.cfg, self.accelerator
        sharded = self._sharded_model()
        if not acc.is_main_process and sharded is None:
            return
        # FSDP: the sharded UNet runs only if every process runs it (its weights are gathered per block),
        # so every process samples; the others draw into a temporary folder that is removed.
        scratch = None if acc.is_main_process else tempfile.mkdtemp(prefix="lyco-sample-")
        try:
            with gathered(sharded):
                path, grid = self._sample_grid(stem, scratch)
        finally:
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        if scratch:
            return
        self.result.sample_grids.append(path)
        if self.log_with == "tensorboard":
            with contextlib.suppress(Exception):
                import numpy as np
                tr = acc.get_tracker("tensorboard", unwrap=True)
                tr.add_image("samples", np.asarray(grid), self.global_step, dataformats="HWC")

    def _sample_grid(self, stem: str, folder: str | None):
        cfg, acc = self.cfg, self.accelerator
        s = cfg.sample
        from . import sample as sample_mod
        res = cfg.resolution
        unet = self.pipe.unet
        unet_training = unet.training
        unet.eval()
        tes = [te for te in self.text.encoders]
        te_modes = [te.training for te in tes]
        for te in tes:
            te.eval()
        try:
            sched = sample_mod.make_scheduler(self.pipe, s.sampler, prediction_type=self.prediction_type,
                                              zero_terminal_snr=cfg.train.zero_terminal_snr)
            path = os.path.join(folder or cfg.output.output_dir, f"{stem}-samples.png")
            clip = cfg.model.clip_skip - 1 if self.family != "sdxl" and cfg.model.clip_skip > 1 else None
            path, grid = sample_mod.sample_grid(
                self.pipe, path, s.prompts, s.seeds, network=self.network, compare_base=s.compare_base,
                title=f"{cfg.output.output_name} - step {self.global_step}",
                negative_prompt=s.negative_prompt, steps=s.steps, guidance_scale=s.guidance_scale,
                width=s.width or res[0], height=s.height or res[1], scheduler=sched, clip_skip=clip,
                autocast=acc.autocast)
        finally:
            unet.train(unet_training)
            for te, m in zip(tes, te_modes):
                te.train(m)
        return path, grid

    def _finish(self):
        cfg, acc = self.cfg, self.accelerator
        if cfg.eval.enabled and (not self.eval_losses or self.eval_losses[-1][0] != self.global_step):
            self._record_eval()
        self.save_checkpoint(cfg.output.output_name, final=True)
        self.result.adapter_path = os.path.join(cfg.output.output_dir, f"{cfg.output.output_name}.safetensors")
        if acc.is_main_process:
            stem = os.path.join(cfg.output.output_dir, cfg.output.output_name)
            _atomic_text(stem + "-loss.json", json.dumps({
                "train": self.losses, "eval": self.eval_losses, "grad_norm": self.grad_norms}, indent=0))
            self.result.loss_curve = plot_losses(self.losses, self.eval_losses, stem + "-loss.png",
                                                 title=cfg.output.output_name)
        acc.wait_for_everyone()

    # ------------------------------------------------------------------ states
    def save_state(self, folder: str) -> str:
        """Write a resumable state (main process; every process's position is the same). The state
        holds whole tensors whatever the strategy (FSDP shards are gathered first, by every process),
        so it resumes on any number of processes and with either strategy."""
        acc = self.accelerator
        main = acc.is_main_process
        sharded = self._sharded_model() is not None
        if not main and not sharded:
            return folder
        from ..formats.safetensors_io import save_tensors
        import numpy as np

        net = acc.unwrap_model(self.model).network
        tensors: dict[str, torch.Tensor] = {f"network.{k}": v for k, v in net.state_dict().items()}
        osd = self._inner_optimizer().state_dict()
        opt_scalars: dict[str, dict[str, Any]] = {}
        for pid in sorted(osd["state"]):
            st = osd["state"][pid]
            for k in sorted(st):
                v = st[k]
                if isinstance(v, torch.Tensor):
                    if self._shards is not None and k != "step" and v.dim() > 0:  # a shard of a parameter's state
                        v = self._shards.as_sharded(v, self._optimizer_params()[pid])
                    tensors[f"optimizer.{pid}.{k}"] = v
                else:
                    opt_scalars.setdefault(str(pid), {})[k] = _jsonable(v)
        # whole tensors (FSDP shards are gathered: a collective, every process in the same order)
        tensors = dict(zip(tensors, full_tensors(list(tensors.values()))))
        if not main:
            return folder
        tensors = {k: v.to("cpu").clone() for k, v in tensors.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        py = random.getstate()
        npst = np.random.get_state()
        sched = {k: _jsonable(v) for k, v in self.lr_scheduler.state_dict().items() if k != "lr_lambdas"}
        scaler = getattr(acc, "scaler", None)
        info = {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "num_processes": acc.num_processes, "total_steps": self.total_steps,
            # the data position in the epoch's global list of batches (what a resume on another number
            # of processes continues from) and the global batch it was trained with
            "global_batches_done": self.batch_in_epoch * acc.num_processes,
            "global_batch": self.cfg.train.batch_size * self.cfg.train.gradient_accumulation_steps * acc.num_processes,
            "strategy": self.strategy,
            "session_id": self.session_id, "training_started_at": self.started_at, "saved_at": time.time(),
            "optimizer": {"param_groups": _jsonable(osd["param_groups"]), "scalars": opt_scalars,
                          "class": type(self._inner_optimizer()).__name__},
            "lr_scheduler": sched,
            "grad_scaler": _jsonable(scaler.state_dict()) if scaler is not None else None,
            "rng": {"python": [py[0], list(py[1]), py[2]],
                    "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]},
            "losses": self.losses, "eval_losses": self.eval_losses, "grad_norms": self.grad_norms,
            "config": self.cfg.to_dict(),
        }
        parent = os.path.dirname(os.path.abspath(folder))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(folder) + ".", suffix=".tmp", dir=parent)
        try:
            save_tensors(tensors, os.path.join(tmp, "state.safetensors"), {"format": STATE_FORMAT})
            _atomic_text(os.path.join(tmp, "state.json"), json.dumps(info, indent=1, default=str))
            _replace_dir(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    def load_state(self, folder: str) -> None:
        """Restore a state written by :meth:`save_state` (``folder`` may also be an output folder:
        its newest state is used)."""
        from ..formats.safetensors_io import load_tensors
        import numpy as np
        folder = find_state(folder)
        try:
            info = json.loads(Path(folder, "state.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise TrainingError(f"{folder}: not a readable training state ({e})") from None
        if info.get("format") != STATE_FORMAT:
            raise TrainingError(f"{folder}: not a lyco training state (format {info.get('format')!r})")
        tensors, _ = load_tensors(os.path.join(folder, "state.safetensors"))
        acc = self.accelerator
        net = acc.unwrap_model(self.model).network if hasattr(self, "model") else self.network
        own = net.state_dict()
        saved = {k[len("network."):]: v for k, v in tensors.items() if k.startswith("network.")}
        if set(saved) != set(own):
            missing, extra = sorted(set(own) - set(saved))[:5], sorted(set(saved) - set(own))[:5]
            raise TrainingError(f"{folder}: the state's adapter does not match this config's network "
                                f"(missing {missing}, unexpected {extra}); resume with the same [network] settings")
        for k, v in saved.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise TrainingError(f"{folder}: adapter tensor {k!r} has shape {tuple(v.shape)}, this network "
                                    f"has {tuple(own[k].shape)}")
        # FSDP: each process keeps its shard of every whole tensor of the state
        net.load_state_dict({k: shard_like(v, own[k]) if is_sharded(own[k]) else v for k, v in saved.items()},
                            strict=True)
        by_id = self._optimizer_params()
        opt_state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optimizer."):
                _, pid, key = k.split(".", 2)
                if key != "step" and self._shards is not None and int(pid) < len(by_id):
                    p = self._shards.param_of(by_id[int(pid)])  # FSDP: keep this process's shard
                    if p is not None and tuple(v.shape) == tuple(p.shape):
                        v = shard_like(v.to(p.dtype), p).to_local()
                opt_state.setdefault(int(pid), {})[key] = v.to(acc.device) if key != "step" else v
        for pid, sc in info["optimizer"]["scalars"].items():
            opt_state.setdefault(int(pid), {}).update(sc)
        groups = info["optimizer"]["param_groups"]
        for g in groups:
            if "betas" in g and isinstance(g["betas"], list):
                g["betas"] = tuple(g["betas"])
        try:
            self._inner_optimizer().load_state_dict({"state": opt_state, "param_groups": groups})
        except (ValueError, KeyError) as e:
            raise TrainingError(f"{folder}: the optimizer state does not fit ({e}); resume with the same "
                                f"[optimizer] and [network] settings") from None
        self.lr_scheduler.load_state_dict({**info["lr_scheduler"], "lr_lambdas": [None] * len(groups)})
        if info.get("grad_scaler") and getattr(acc, "scaler", None) is not None:
            acc.scaler.load_state_dict(info["grad_scaler"])
        self.global_step = int(info["step"])
        self.epoch = int(info["epoch"])
        self.batch_in_epoch = int(info["batch_in_epoch"])
        saved_procs = int(info.get("num_processes", 1))
        if saved_procs != acc.num_processes:
            # the position is a count of global batches: exact on the new number of processes when it
            # divides (always, when the global batch stays the same)
            done = int(info.get("global_batches_done", self.batch_in_epoch * saved_procs))
            self.batch_in_epoch = math.ceil(done / acc.num_processes)
            if done % acc.num_processes:
                log.warning("resuming a %d-process state with %d processes: %d batches of the epoch were done, "
                            "which is no multiple of %d; continuing after batch %d (some samples are skipped)",
                            saved_procs, acc.num_processes, done, acc.num_processes,
                            self.batch_in_epoch * acc.num_processes)
        t = self.cfg.train
        new_global = t.batch_size * t.gradient_accumulation_steps * acc.num_processes
        if info.get("global_batch") and int(info["global_batch"]) != new_global:
            log.warning("the state was trained with a global batch of %s (batch × accumulation × processes), this "
                        "run uses %d: training continues with the new batch (set gradient_accumulation_steps to "
                        "keep it)", info["global_batch"], new_global)
        if info.get("total_steps") and int(info["total_steps"]) != self.total_steps:
            log.warning("the state was made for %s steps, this run has %d: the learning-rate schedule differs",
                        info["total_steps"], self.total_steps)
        self.losses = [tuple(x) for x in info.get("losses", [])]
        self.eval_losses = [tuple(x) for x in info.get("eval_losses", [])]
        self.grad_norms = [tuple(x) for x in info.get("grad_norms", [])]
        self.session_id = info.get("session_id", self.session_id)
        self.started_at = info.get("training_started_at", self.started_at)
        torch.set_rng_state(tensors["rng.torch"])
        if torch.cuda.is_available():
            cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        py = info["rng"]["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = info["rng"]["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        if self.accelerator.is_main_process:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", folder, self.global_step,
                     self.epoch + 1, self.batch_in_epoch)


def find_state(path: str) -> str:
    """A state folder, or the newest state (by step) in an output folder."""
    p = Path(path)
    if (p / "state.json").is_file():
        return str(p)
    if p.is_dir():
        cands = []
        for d in p.iterdir():
            j = d / "state.json"
            if d.is_dir() and not d.name.startswith(".") and j.is_file():
                try:
                    cands.append((int(json.loads(j.read_text(encoding="utf-8")).get("step", -1)), str(d)))
                except (OSError, ValueError):
                    continue
        if cands:
            return max(cands)[1]
    raise ConfigError(f"--resume {path}: no training state there (a '<name>-…-state' folder holding "
                      f"state.json, or an output folder containing one)")


# --------------------------------------------------------------------------------------
# Loss curve
# --------------------------------------------------------------------------------------


def plot_losses(losses, eval_losses, path: str, title: str = "") -> str | None:
    """Training loss (raw and smoothed) and the fixed-batch eval loss as a PNG (matplotlib when
    installed, else a plain PIL drawing)."""
    if not losses:
        return None
    steps = [s for s, _ in losses]
    vals = [v for _, v in losses]
    ema, smooth = None, []
    a = 2 / (min(50, max(2, len(vals) // 10)) + 1)
    for v in vals:
        ema = v if ema is None else a * v + (1 - a) * ema
        smooth.append(ema)
    from ..formats.safetensors_io import atomic_write
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot(steps, vals, color="#9bb7d4", lw=0.8, label="train loss")
        ax.plot(steps, smooth, color="#1f4e79", lw=1.8, label="train loss (smoothed)")
        if eval_losses:
            ax.plot([s for s, _ in eval_losses], [v for _, v in eval_losses], "o-", color="#c0392b", lw=1.2,
                    label="fixed-batch eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_write(path, overwrite=True) as f:
            fig.savefig(f, format="png")
        plt.close(fig)
        return path
    except ImportError:
        pass
    from PIL import Image, ImageDraw
    W, H, m = 700, 400, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    allv = vals + [v for _, v in eval_losses]
    lo, hi = min(allv), max(allv)
    hi = hi if hi > lo else lo + 1
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

    def xy(s, v):
        return m + (s - x0) / (x1 - x0) * (W - 2 * m), H - m - (v - lo) / (hi - lo) * (H - 2 * m)
    d.rectangle([m, m, W - m, H - m], outline="black")
    d.line([xy(s, v) for s, v in zip(steps, vals)], fill=(155, 183, 212), width=1)
    d.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(31, 78, 121), width=2)
    if eval_losses:
        d.line([xy(s, v) for s, v in eval_losses], fill=(192, 57, 43), width=2)
    d.text((m, 10), f"{title}  loss {lo:.4f}..{hi:.4f}", fill="black")
    with atomic_write(path, overwrite=True) as f:
        img.save(f, format="PNG")
    return path


def train(cfg: Config, **kw) -> TrainResult:
    """Train an adapter as ``cfg`` says; see :class:`Trainer`."""
    return Trainer(cfg, **kw).train()

"""The contract every algorithm implements, and the layer description it receives.

An algorithm is a stateless object with pure functions over plain tensors. Tensors are
named with the *suffixes used in LyCORIS/kohya files* (``lora_up.weight``, ``hada_w1_a``,
``alpha`` ...): those names are the algorithm's own vocabulary, not a file concern.

Conventions shared by all algorithms:

* ``delta_weight(t, spec, weight)`` returns ΔW in the layer's weight layout, the scale
  (alpha/rank and friends) included, the runtime multiplier excluded. ``weight`` is the
  base weight (needed by OFT, IA3, GLoRA and DoRA; ignored by the others).
* The merged weight at multiplier ``m`` is ``W + m·ΔW`` unless the algorithm overrides
  :meth:`Algorithm.merged` (BOFT interpolates each butterfly stage, so it is non-linear in m).
* ``forward_delta(x, t, spec, base, base_out)`` returns Δy for multiplier 1 ("bypass"),
  equal to ``op(x, ΔW) (+Δb)``; subclasses override it with a structured path that never
  materialises ΔW where the algebra allows.
* Everything is computed in the tensors' dtype; callers pass fp32 (or wider) for merging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from . import graph_policy

Tensors = dict[str, torch.Tensor]

# --------------------------------------------------------------------------------------
# Layer description
# --------------------------------------------------------------------------------------

LINEAR, CONV1D, CONV2D, CONV3D, LAYERNORM, GROUPNORM = (
    "linear", "conv1d", "conv2d", "conv3d", "layernorm", "groupnorm")
CONV_KINDS = (CONV1D, CONV2D, CONV3D)
NORM_KINDS = (LAYERNORM, GROUPNORM)


@dataclass(frozen=True)
class LayerSpec:
    """What an algorithm needs to know about the layer it adapts (no tensors)."""

    kind: str
    weight_shape: tuple[int, ...]
    has_bias: bool = False
    stride: tuple[int, ...] = ()
    padding: Any = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = "zeros"
    eps: float = 1e-5
    num_groups: int = 1  # GroupNorm
    normalized_shape: tuple[int, ...] = ()  # LayerNorm

    # -- shapes ---------------------------------------------------------------------
    @property
    def out_dim(self) -> int:
        return self.weight_shape[0]

    @property
    def in_dim(self) -> int:
        """Input features of the weight (``in/groups`` for a grouped conv)."""
        return self.weight_shape[1] if len(self.weight_shape) > 1 else self.weight_shape[0]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel) if self.kernel else 1

    @property
    def pads(self) -> tuple[int, ...]:
        """Zero padding per spatial axis, for ``padding`` given as an int or a tuple (not ``"same"``/``"valid"``)."""
        p = self.padding
        return tuple(p) if isinstance(p, (tuple, list)) else (p,) * len(self.kernel)

    @property
    def is_conv(self) -> bool:
        return self.kind in CONV_KINDS

    @property
    def is_norm(self) -> bool:
        return self.kind in NORM_KINDS

    @property
    def is_kxk_conv(self) -> bool:
        return self.is_conv and any(k != 1 for k in self.kernel)

    @property
    def flat_in(self) -> int:
        """Columns of the weight flattened to 2-D: ``in/groups · ∏k``."""
        return self.in_dim * self.kernel_numel

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module) -> "LayerSpec":
        kind = layer_kind(module)
        if kind is None:
            raise ConfigError(f"unsupported layer type {type(module).__name__}")
        w = module.weight
        has_bias = getattr(module, "bias", None) is not None
        if kind == LINEAR:
            return cls(kind, tuple(w.shape), has_bias)
        if kind in CONV_KINDS:
            return cls(kind, tuple(w.shape), has_bias, tuple(module.stride), module.padding,
                       tuple(module.dilation), int(module.groups), module.padding_mode)
        if kind == LAYERNORM:
            return cls(kind, tuple(w.shape), has_bias, eps=float(module.eps),
                       normalized_shape=tuple(module.normalized_shape))
        return cls(kind, tuple(w.shape), has_bias, eps=float(module.eps), num_groups=int(module.num_groups))


def layer_kind(module: nn.Module) -> str | None:
    """The kind of a supported layer, by type (subclasses included), or None."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Conv1d):
        return CONV1D
    if isinstance(module, nn.Conv2d):
        return CONV2D
    if isinstance(module, nn.Conv3d):
        return CONV3D
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine and module.weight is not None:
        return LAYERNORM
    if isinstance(module, nn.GroupNorm) and module.affine:
        return GROUPNORM
    return None


# --------------------------------------------------------------------------------------
# Functional helpers shared by the algorithm files
# --------------------------------------------------------------------------------------

_CONV_FN = {CONV1D: F.conv1d, CONV2D: F.conv2d, CONV3D: F.conv3d}


def layer_op(x: torch.Tensor, spec: LayerSpec, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Run the layer's operation with another weight (and bias): ``op(x, W, b)``."""
    if spec.kind == LINEAR:
        return F.linear(x, weight, bias)
    if spec.kind in CONV_KINDS:
        if spec.padding_mode != "zeros":
            rev = []
            for p in reversed(spec.pads):
                rev += [p, p]
            x = F.pad(x, rev, mode=spec.padding_mode)
            return _CONV_FN[spec.kind](x, weight, bias, spec.stride, 0, spec.dilation, spec.groups)
        return _CONV_FN[spec.kind](x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups)
    if spec.kind == LAYERNORM:
        return F.layer_norm(x, spec.normalized_shape, weight, bias, spec.eps)
    if spec.kind == GROUPNORM:
        return F.group_norm(x, spec.num_groups, weight, bias, spec.eps)
    raise ValueError(spec.kind)


def channel_view(v: torch.Tensor, spec: LayerSpec, y: torch.Tensor) -> torch.Tensor:
    """Reshape a per-output-channel vector to broadcast against the layer's output ``y``."""
    if spec.is_conv or spec.kind == GROUPNORM:
        return v.reshape((1, -1) + (1,) * (y.dim() - 2))
    return v  # channels last (linear, layernorm)


def input_channel_view(v: torch.Tensor, spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    if spec.is_conv:
        return v.reshape((1, -1) + (1,) * (x.dim() - 2))
    return v


def flat(w: torch.Tensor) -> torch.Tensor:
    """A weight as 2-D ``(out, -1)``, row-major (the LyCORIS/kohya convention)."""
    return w.reshape(w.shape[0], -1)


def scalar_of(t: Mapping[str, torch.Tensor], name: str = "alpha") -> float | None:
    """A 0-d/1-element tensor entry as a float. The forward path passes such frozen scalars as
    Python numbers already (see ``AdapterLayer._hot_tensors``): no device sync per call."""
    a = t.get(name)
    if a is None:
        return None
    if isinstance(a, (int, float)):
        return float(a)
    return float(a.reshape(-1)[0]) if a.numel() else None


def rebuild_tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``R[p,q,…] = Σ_ij core[i,j,…]·up[i,p]·down[j,q]`` (``up``/``down`` given as (r, out)/(r, in))."""
    return torch.einsum("ij...,ip,jq->pq...", core, up, down)


def _fusable(*ts: torch.Tensor) -> bool:
    d = ts[0].dtype
    return all(t.dtype == d for t in ts)


def accumulate_linear(acc: torch.Tensor, h: torch.Tensor, w: torch.Tensor, alpha: float = 1.0,
                      inplace: bool = False) -> torch.Tensor:
    """``acc + alpha · h @ wᵀ`` (h ``(…, k)``, w ``(n, k)``, acc ``(…, n)``) as one GEMM with the add
    (and the scale) fused: ``addmm_``/``baddbmm_`` into ``acc`` itself when ``inplace`` (the caller
    owns ``acc`` and nothing saved it for backward), else ``addmm`` into a new tensor.
    ``alpha`` must be a Python number (fold tensor scales into ``w``)."""
    if _fusable(acc, h, w) and acc.dim() >= 2 and acc.shape[:-1] == h.shape[:-1]:
        if inplace and acc.dim() == 2:
            return acc.addmm_(h, w.t(), alpha=alpha)
        if inplace and acc.dim() == 3:
            return acc.baddbmm_(h, w.t().expand(acc.shape[0], -1, -1), alpha=alpha)
        if acc.is_contiguous():
            out = torch.addmm(acc.reshape(-1, acc.shape[-1]), h.reshape(-1, h.shape[-1]), w.t(), alpha=alpha)
            return out.view(acc.shape)
    d = F.linear(h, w).to(acc.dtype)
    return acc + d if alpha == 1.0 else torch.add(acc, d, alpha=alpha)


def scaled_bmm(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """``s·bmm(a, b)``, s in the batched GEMM's alpha: a ``mul_`` after it would be one more kernel per layer and step
    (``beta = 0``: the uninitialised 0-d input is never read)."""
    return torch.bmm(a, b) if s == 1.0 else torch.baddbmm(a.new_empty(()), a, b, beta=0, alpha=s)


class _Conv1x1AccCL(torch.autograd.Function):
    """``acc + alpha · conv1x1(h, w)`` for a channels-last 4-D ``acc``: the positions are its rows, so one batched
    GEMM ``(N, P, O) = acc + alpha · hᵀ·wᵀ`` writes the output channels-last like acc, and the backward is two
    GEMMs over transposed views — ``∂h = alpha · w ᵀ·∂yᵀ`` written ``(N, R, P)`` (h's own layout: the grouped
    down's conv backward behind it reads it as it is) and ``∂w = alpha · Σ ∂yᵀ·hᵀ`` in w's layout — with ∂acc ∂y
    itself. Why not autograd's: a channels-last acc took the 1×1 conv fallback, whose weight gradient cuDNN ran as
    ``wgrad2d_grouped_direct_kernel`` over the channels-last ∂y — H200, SD1.5 b1 LoKr on the frozen conv layout
    (``--frozen-cl rule``, run 280's makers): 15 launches at 50 µs on the 8×8 level's 1280-wide delta-path convs,
    0.75 ms of the step (run 281's A/B: −0.74 ms). A plain ``baddbmm`` over the same views would leave ∂h and ∂w
    strided — by inference from its backward's formulas, not measured: a copy more per layer each, where cuDNN's conv
    backward and autograd's accumulation make them contiguous."""

    @staticmethod
    def forward(ctx, acc, h, w, alpha: float):
        n, o, hh, ww = acc.shape
        r, p = h.shape[1], hh * ww
        wt = w.reshape(o, r).t()
        out = torch.baddbmm(acc.permute(0, 2, 3, 1).reshape(n, p, o), h.reshape(n, r, p).transpose(1, 2),
                            wt.unsqueeze(0) if n == 1 else wt.expand(n, r, o), alpha=alpha)
        ctx.save_for_backward(h, w)
        ctx.alpha = alpha
        return out.view(n, hh, ww, o).permute(0, 3, 1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        h, w = ctx.saved_tensors
        s = ctx.alpha
        n, o, hh, ww = gy.shape
        r, p = h.shape[1], hh * ww
        g3t = gy.permute(0, 2, 3, 1).reshape(n, p, o).transpose(1, 2)  # (N, O, P): a view of a channels-last ∂y
        need_acc, need_h, need_w = ctx.needs_input_grad[:3]
        gh = gw = None
        if need_h:
            wt = w.reshape(o, r).t()
            gh = scaled_bmm(wt.unsqueeze(0) if n == 1 else wt.expand(n, r, o), g3t, s).view(h.shape)
        if need_w:
            gw = scaled_bmm(g3t, h.reshape(n, r, p).transpose(1, 2), s)  # (N, O, R): one GEMM for one sample
            gw = (gw[0] if n == 1 else gw.sum(0)).view(w.shape)
        return (gy if need_acc else None), gh, gw, None


def accumulate_conv1x1(acc: torch.Tensor, h: torch.Tensor, w: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``acc + alpha · conv1x1(h, w)`` for channels-first ``acc (N, O, *sp)``, ``h (N, R, *sp)``,
    ``w (O, R, 1…)``: one batched GEMM with the add and the scale fused. For one sample w is a batch of one by a
    view, not an expand: autograd's backward of an expand sums over the batch — for one sample a copy, one
    ``reduce_kernel`` per layer (H100, SD1.5 b1, run 257's ``--graph-makers``: LoKr's 27 on its 1280-wide delta-path
    convs, 0.14 ms; LoCon's 25, run 255: 0.11 ms). A channels-last 4-D acc (the frozen conv's output where its
    weight is channels-last, :mod:`lyco.models.layout`): :class:`_Conv1x1AccCL`, the output channels-last too, where
    ``LYCO_ACC_CL`` (:mod:`.graph_policy`, captured steps by default: its backward is Python per layer) — else the
    1×1 conv and an add."""
    fits = (_fusable(acc, h, w) and acc.dim() >= 3 and acc.dim() == h.dim() and acc.shape[0] == h.shape[0]
            and acc.shape[2:] == h.shape[2:])
    if (fits and acc.dim() == 4 and not acc.is_contiguous() and acc.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling() and graph_policy.wanted("LYCO_ACC_CL")):
        return _Conv1x1AccCL.apply(acc, h, w, float(alpha))
    if fits and acc.is_contiguous():
        n, o, r = acc.shape[0], acc.shape[1], h.shape[1]
        wb = w.reshape(1, o, r) if n == 1 else w.reshape(o, r).expand(n, o, r)
        out = torch.baddbmm(acc.reshape(n, o, -1), wb, h.reshape(n, r, -1), alpha=alpha)
        return out.view(acc.shape)
    conv = _CONV_FN[{3: CONV1D, 4: CONV2D, 5: CONV3D}[h.dim()]]
    d = conv(h, w.reshape(w.shape[0], w.shape[1], *([1] * (h.dim() - 2)))).to(acc.dtype)
    return acc + d if alpha == 1.0 else torch.add(acc, d, alpha=alpha)


def alpha_scale(t: Mapping[str, torch.Tensor], rank: int) -> float:
    """γ = alpha/rank; a missing alpha (or 0) means alpha = rank (γ = 1), as every loader does."""
    a = scalar_of(t)
    if a is None or a == 0 or not math.isfinite(a):
        return 1.0
    return a / rank


def alpha_tensor(alpha: float) -> torch.Tensor:
    return torch.tensor(float(alpha), dtype=torch.float32)


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------

# Options every algorithm accepts (the dropout family and the runtime-only knobs).
COMMON_OPTIONS: dict[str, Any] = {
    "dropout": 0.0,          # dropout on the adapter output (kohya "network dropout")
    "rank_dropout": 0.0,     # drop rank channels (LoRA) / rows of ΔW (others) in training
    "rank_dropout_scale": False,  # rescale the kept ranks by 1/mean(mask)
    "module_dropout": 0.0,   # skip the whole adapter in training with this probability
}

_BOOL_STRINGS = {"true": True, "1": True, "yes": True, "on": True,
                 "false": False, "0": False, "no": False, "off": False}


def coerce_option(name: str, value: Any, default: Any) -> Any:
    """Coerce a value (possibly a kohya-style string) to the type of the default, strictly."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        s = str(value).strip().lower()
        if s in _BOOL_STRINGS:
            return _BOOL_STRINGS[s]
        raise ConfigError(f"option {name!r}: expected a boolean, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"option {name!r}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"option {name!r}: expected an integer, got {value!r}")
        return int(f)
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"option {name!r}: expected a number, got {value!r}") from None
    if isinstance(default, str):
        return str(value)
    return value


# --------------------------------------------------------------------------------------
# The algorithm base class
# --------------------------------------------------------------------------------------


class Algorithm:
    """Base class: subclasses set the class attributes and implement create/delta_weight."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    #: every tensor name the algorithm reads or writes (file suffixes)
    keys: ClassVar[frozenset[str]] = frozenset()
    #: tensors that must be present for :meth:`detect` to claim a module
    detect_keys: ClassVar[tuple[str, ...]] = ()
    #: tensors that are never trained (alpha, flags)
    frozen_keys: ClassVar[frozenset[str]] = frozenset({"alpha"})
    #: layer kinds supported
    kinds: ClassVar[tuple[str, ...]] = (LINEAR, CONV1D, CONV2D, CONV3D)
    #: algorithm-specific options and their defaults (``rank``/``alpha`` are always accepted)
    options: ClassVar[dict[str, Any]] = {}
    #: whether ΔW is independent of the base weight (LoRA yes, OFT no)
    weight_independent: ClassVar[bool] = True
    #: whether the merged weight is linear in the multiplier (W + m·ΔW)
    linear_in_multiplier: ClassVar[bool] = True
    #: whether DoRA can wrap this algorithm
    supports_dora: ClassVar[bool] = False
    #: whether the bypass op's down acts on channel groups (LoKr's low-rank W2, :meth:`bypass_factors`): the op's
    #: shape rule (:func:`.lowrank.bypass_pays`) then leaves out what it measured only for ungrouped adapters
    bypass_grouped: ClassVar[bool] = False

    # -- detection --------------------------------------------------------------------
    @classmethod
    def detect(cls, keys: set[str], tensors: Mapping[str, torch.Tensor] | None = None) -> bool:
        return bool(cls.detect_keys) and all(k in keys for k in cls.detect_keys)

    def supports(self, spec: LayerSpec) -> bool:
        return spec.kind in self.kinds

    def validate_options(self, opts: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults and reject unknown options (never drop them silently)."""
        allowed = {"rank": 4, "alpha": None, **COMMON_OPTIONS, **self.options}
        out = {}
        for k, v in opts.items():
            if k not in allowed:
                raise ConfigError(
                    f"algorithm {self.name!r}: unknown option {k!r}; "
                    f"accepted: {', '.join(sorted(allowed))}")
            out[k] = coerce_option(k, v, allowed[k])
        for k, d in allowed.items():
            out.setdefault(k, d)
        return out

    # -- the math ---------------------------------------------------------------------
    def create(self, spec: LayerSpec, opts: Mapping[str, Any], weight: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensors:
        """Initial tensors (fp32) such that ΔW starts at zero (or as the method prescribes)."""
        raise NotImplementedError

    def rank(self, t: Mapping[str, torch.Tensor]) -> int | None:
        return None

    def scale(self, t: Mapping[str, torch.Tensor]) -> float:
        r = self.rank(t)
        return alpha_scale(t, r) if r else 1.0

    def delta_weight(self, t: Mapping[str, torch.Tensor], spec: LayerSpec,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def delta_bias(self, t: Mapping[str, torch.Tensor], spec: LayerSpec,
                   bias: torch.Tensor | None = None) -> torch.Tensor | None:
        return None

    def merged(self, t: Mapping[str, torch.Tensor], spec: LayerSpec, weight: torch.Tensor,
               bias: torch.Tensor | None, multiplier: float):
        """(W', b') at this multiplier. Default: ``W + m·ΔW``, ``b + m·Δb``."""
        dw = self.delta_weight(t, spec, weight)
        w2 = torch.add(weight, dw.to(weight.dtype), alpha=multiplier)  # one op, one rounding
        db = self.delta_bias(t, spec, bias)
        if db is None:
            return w2, bias
        b0 = bias if bias is not None else torch.zeros_like(db)
        return w2, torch.add(b0, db.to(b0.dtype), alpha=multiplier)

    #: ``mode="auto"`` runs the rebuild path (``op(x, W + m·ΔW)``) instead of the bypass
    #: (``f(x) + m·Δy``) for this algorithm: true where ΔW costs no more than the structured Δy
    #: (Full: a bypass is a second full-size GEMM forward and two more backward).
    prefers_rebuild: ClassVar[bool] = False

    def prefers_rebuild_for(self, t: Mapping[str, Any], spec: LayerSpec) -> bool:
        """Per layer (``mode = "auto"``): whether the rebuild path is the better one for these tensors
        on this layer. Default: the class's ``prefers_rebuild``."""
        return self.prefers_rebuild

    def prefers_rebuild_in_op(self, t: Mapping[str, Any], spec: LayerSpec, x: torch.Tensor | None = None) -> bool:
        """Per layer (``mode = "auto"``), in the steps that take the bypass op (:mod:`.lowrank`'s captured-steps
        policy): whether the rebuild path beats the op there, for the input ``x`` where given. Default False
        (LoKr: its narrow layers on inputs with enough rows)."""
        return False

    #: whether :meth:`prefers_op_over_rebuild` can hold for this algorithm (the layer host asks only then)
    op_over_rebuild: ClassVar[bool] = False

    def prefers_op_over_rebuild(self, t: Mapping[str, Any], spec: LayerSpec, x: torch.Tensor) -> bool:
        """Per layer and input (``mode = "auto"``), where :meth:`prefers_rebuild_for` holds, in the steps that take the
        bypass op: whether :meth:`bypass_op` beats the rebuild path there. Default False (LoKr: a full W2 on a k×k
        conv with few positions per weight; GLoRA: linear layers and 1×1 convs)."""
        return False

    def rebuild_op(self, x: torch.Tensor, t: Mapping[str, torch.Tensor], spec: LayerSpec, weight: torch.Tensor,
                   bias: torch.Tensor | None, multiplier: float) -> torch.Tensor | None:
        """``op(x, W′, b′)`` for the rebuild path, or None (then the host runs ``layer_op`` on
        :meth:`merged` with plain autograd). Default: a low-rank delta (:meth:`lowrank_factors`) takes
        :mod:`.lowrank`'s op (factored backward: no weight-gradient GEMM, no nested autograd); anything
        else :mod:`.rebuild`'s op over :meth:`merged` — ``x`` kept for backward, ``W′`` rebuilt there —
        on linear and zero-padded conv layers."""
        f = self.lowrank_factors(t, spec, x.dtype)
        if f is not None:
            y = lowrank_op(x, spec, weight, bias, f[0], f[1], f[2] * multiplier)
            if y is not None:
                return y
        build, keys = merged_build(self, t, spec, multiplier)
        return rebuilt_op(x, spec, weight, bias, build, *(t[k] for k in keys))

    #: the rebuild-path op a group of this algorithm's layers sharing an input runs as one (:mod:`lyco.siblings`),
    #: a name there, or None; the layer host asks :meth:`shared_part` only where it is set ((IA)³: ``"ia3"``)
    shared_rebuild: ClassVar[str | None] = None

    def shared_part(self, x: torch.Tensor, t: Mapping[str, torch.Tensor], spec: LayerSpec, weight: torch.Tensor,
                    bias: torch.Tensor | None, multiplier: float):
        """On the rebuild path: what this layer brings to its group's one op (:attr:`shared_rebuild`) for the 2-D
        rows ``x``, or None (it runs :meth:`rebuild_op` alone). Default None."""
        return None

    def bypass_op(self, x: torch.Tensor, t: Mapping[str, torch.Tensor], spec: LayerSpec, weight: torch.Tensor,
                  bias: torch.Tensor | None, multiplier: float) -> torch.Tensor | None:
        """``op(x, W, b) + Δy`` computed exactly, with :mod:`.lowrank`'s bypass backward (∂x through the merged
        weight), where this adapter's delta is a low-rank product on this layer (:meth:`bypass_factors`);
        else None. The layer host calls it only where :func:`.lowrank.bypass_ready` holds."""
        f = self.bypass_factors(t, spec, x.dtype)
        if f is None:
            return None
        return bypass_op(x, spec, weight, bias, f[0], f[1], f[2] * multiplier, f[3])

    def bypass_factors(self, t: Mapping[str, Any], spec: LayerSpec,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float, int] | None:
        """``(D, U, γ, groups)`` for :meth:`bypass_op`: :meth:`lowrank_factors` with one group, unless the
        algorithm has a grouped down (``D = kron(I_groups, down)`` on a conv; LoKr)."""
        f = self.lowrank_factors(t, spec, dtype)
        return None if f is None else (*f, 1)

    def lowrank_factors(self, t: Mapping[str, Any], spec: LayerSpec,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(D, U, γ)`` with ``ΔW = γ·U·D`` — ``D`` ``(r, in)`` or a conv kernel ``(r, in, *k)`` carrying
        the layer's geometry, ``U`` ``(out, r[, 1…])``, γ a Python number — when this adapter's delta is
        such a product on this layer (then :mod:`.lowrank`'s op trains it on the rebuild path), else None."""
        return None

    def forward_accumulate(self, acc: torch.Tensor, x: torch.Tensor, t: Mapping[str, torch.Tensor],
                           spec: LayerSpec, weight: torch.Tensor, bias: torch.Tensor | None,
                           base_out: torch.Tensor, multiplier: float, inplace: bool = False) -> torch.Tensor:
        """``acc + Δy(multiplier)`` — what the layer host adds for this adapter (no dropout family).

        Same value as ``acc + m·forward_delta(…)``; subclasses fuse the scale and the add into their
        last product. ``inplace``: the caller owns ``acc`` (a fresh tensor nothing saved for backward)
        and it may be overwritten. The default: the scale folded into the add, one pass."""
        if self.linear_in_multiplier:
            d = self.forward_delta(x, t, spec, weight, bias, base_out)
            if d.dtype != acc.dtype:
                d = d.to(acc.dtype)
            return acc + d if multiplier == 1.0 else torch.add(acc, d, alpha=multiplier)
        d = self.forward_delta(x, t, spec, weight, bias, base_out, multiplier=multiplier)
        return acc + d.to(acc.dtype)

    def forward_delta(self, x: torch.Tensor, t: Mapping[str, torch.Tensor], spec: LayerSpec,
                      weight: torch.Tensor, bias: torch.Tensor | None,
                      base_out: torch.Tensor) -> torch.Tensor:
        """Δy at multiplier 1. The default materialises ΔW: ``op(x, ΔW, Δb)``."""
        dw = self.delta_weight(t, spec, weight).to(x.dtype)
        db = self.delta_bias(t, spec, bias)
        if spec.is_norm:
            # op(x, Δw, Δb) for a norm is normalize(x)·Δw + Δb, linear in (Δw, Δb)
            return layer_op(x, spec, dw, db.to(x.dtype) if db is not None else None)
        return layer_op(x, spec, dw, db.to(x.dtype) if db is not None else None)

    # -- save-time normalisation ------------------------------------------------------
    def export(self, t: Mapping[str, torch.Tensor]) -> Tensors:
        """Tensors as written to a file (e.g. ``scalar`` folded into a factor)."""
        return {k: v for k, v in t.items()}

    def infer_weight_shape(self, t: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
        """The adapted weight's shape from the tensors alone, possibly flattened to 2-D
        ``(out, in·∏k)`` (enough for norms and SVD); None when it needs the base layer."""
        return None

    def describe(self, t: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Human-facing summary used by ``lyco inspect``."""
        return {"rank": self.rank(t), "alpha": scalar_of(t), "scale": self.scale(t)}


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

_REGISTRY: dict[str, Algorithm] = {}
_DETECT_ORDER: list[Algorithm] = []


def register(cls):
    inst = cls()
    for n in (cls.name, *cls.aliases):
        if n in _REGISTRY:
            raise RuntimeError(f"algorithm name {n!r} registered twice")
        _REGISTRY[n] = inst
    _DETECT_ORDER.append(inst)
    return cls


def get(name: str) -> Algorithm:
    from . import _load_all  # noqa: F401  (ensure every algorithm file is imported)
    key = name.lower().replace("_", "-")
    if key not in _REGISTRY:
        raise ConfigError(f"unknown algorithm {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def names() -> list[str]:
    from . import _load_all  # noqa: F401
    return sorted({a.name for a in _REGISTRY.values()})


def detect(tensors: Mapping[str, torch.Tensor]) -> Algorithm | None:
    """The algorithm that claims a module's tensors (by key names and shapes), or None."""
    from . import _load_all  # noqa: F401
    keys = set(tensors)
    for alg in _DETECT_ORDER:
        if alg.detect(keys, tensors):
            return alg
    return None


def get_for(name: str, tensors: Mapping[str, torch.Tensor] | None = None) -> Algorithm:
    """The algorithm for a module, wrapped in DoRA when the tensors carry ``dora_scale``."""
    alg = get(name)
    if tensors is not None and "dora_scale" in tensors and not getattr(alg, "is_dora", False):
        from .dora import wrap
        return wrap(alg)
    return alg


def detect_for(tensors: Mapping[str, torch.Tensor]) -> Algorithm | None:
    """:func:`detect`, then DoRA-wrapped when ``dora_scale`` is present."""
    alg = detect({k: v for k, v in tensors.items() if k != "dora_scale"})
    if alg is not None and "dora_scale" in tensors:
        from .dora import wrap
        return wrap(alg)
    return alg


# The shared layer ops are built on the helpers above; imported last (they import this module), once,
# rather than inside the hot per-call methods.
from .lowrank import bypass_op, lowrank_op  # noqa: E402
from .rebuild import merged_build, rebuilt_op  # noqa: E402

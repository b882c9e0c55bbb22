"""GLoRA (generalised LoRA): ``f(x) = W(x + γA(x)) + γB(x)`` with low-rank A (in→in) and B (in→out).

File tensors (LyCORIS ≥ 3.0, the layout we write):
  linear  ``a1.weight (in, r)``, ``a2.weight (r, in)``, ``b1.weight (out, r)``, ``b2.weight (r, in)``
  conv    ``a1.weight (in, r, 1…)``, ``a2.weight (r, in, 1…)`` (1×1), ``b1.weight (out, r, 1…)`` (1×1),
          ``b2.weight (r, in, *k)`` (carries the kernel; applied with the layer's stride/padding)
  ``alpha`` 0-d, written raw (as LyCORIS); γ = alpha / r with r = ``a2.weight.shape[0]``;
  ``bm.weight`` (a Tucker core LyCORIS declares but can never create) is ignored if present.

  ΔW = γ·(W·A1·A2 + B1·B2), where W·A1 contracts W's input axis with ``a1`` (in, r) and keeps
  the kernel axes, and B1·B2 = ``b1`` (out, r) @ ``b2`` flattened (r, in·∏k), reshaped to W.

ΔW depends on W. Bypass: ``Δy = γ·op(A(x), W) + γ·B(x)`` with ``A(x) = a1(a2(x))`` (1×1 / linear),
``B(x) = b1(b2(x))``; the base bias is not counted twice (op without bias), which is what LyCORIS's
``f(x + γA(x)) + γB(x)`` computes as well.

Older files (pre-3.0 LyCORIS GLoRA, still read by ComfyUI and A1111) use the other orientation:
``a1 (r, in)``, ``a2 (in, r)``, ``b1 (r, in)``, ``b2 (out, r)``, γ = alpha / ``a1.shape[0]`` and
``ΔW = γ·(b2·b1 + W·a2·a1)`` on the flattened tensors. We tell them apart exactly as ComfyUI
does (:func:`glora_layout`): "old" when ``b2[1] == b1[0] == a1[0] == a2[1]``; "new" when
``b2[0] == b1[1] == a1[1] == a2[0]``, except that when both hold the file is read as old if
``a2[0] == out`` and W is square. That last case (a *new* file with r == in == out) is genuinely
ambiguous: ComfyUI reads it as old (A1111 always uses the old formula), LyCORIS as new. We read it
as the loaders do and refuse to *create* such an adapter (pick another rank), so what we write is
never ambiguous.

Decisions: alpha missing (or 0) → γ = 1, as ComfyUI (A1111 refuses the module). No rs-LoRA
(LyCORIS's rs_lora GLoRA saves alpha unadjusted, so its files disagree with its own training).
``use_scalar``: a2 and b2 start random, ``scalar`` at 0, folded into a2 and b2 on export.
Grouped convs are not supported (A(x) mixes all input channels).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ..errors import ConfigError, ShapeMismatch
from . import lowrank, lowrank_triton
from .base import (
    CONV1D, CONV2D, CONV3D, LINEAR, Algorithm, Tensors, accumulate_linear, alpha_scale, alpha_tensor, flat,
    layer_op, register, scalar_of,
)
from .casts import cast_factor
from .rebuild import like, rebuilt_op, supports as rebuild_supports

_CONV_FN = {CONV1D: F.conv1d, CONV2D: F.conv2d, CONV3D: F.conv3d}
_A1, _A2, _B1, _B2 = "a1.weight", "a2.weight", "b1.weight", "b2.weight"


def _kaiming(shape, generator=None):
    # kaiming_uniform_(a=√5) == U(−1/√fan_in, 1/√fan_in), fan_in = ∏ shape[1:]
    w = torch.empty(shape, dtype=torch.float32)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    bound = 1.0 / math.sqrt(fan_in)
    return w.uniform_(-bound, bound, generator=generator)


def glora_shapes(spec, rank: int) -> dict[str, tuple[int, ...]]:
    ones = (1,) * len(spec.kernel)
    return {_A1: (spec.in_dim, rank) + ones, _A2: (rank, spec.in_dim) + ones,
            _B1: (spec.out_dim, rank) + ones, _B2: (rank, spec.in_dim) + spec.kernel}


def glora_layout(t, weight_shape=None) -> tuple[str, int]:
    """(``"new"`` | ``"old"``, rank) by ComfyUI's shape rule (see module doc).

    Without ``weight_shape`` the doubly-matching case is settled by assuming the rank is the
    smaller candidate, which is what the rule gives whenever r ≤ layer width.
    """
    a1, a2, b1, b2 = (t[k].shape for k in (_A1, _A2, _B1, _B2))
    old = b2[1] == b1[0] == a1[0] == a2[1]
    new = b2[0] == b1[1] == a1[1] == a2[0]
    if old and new:
        if weight_shape is not None:
            square = len(weight_shape) > 1 and weight_shape[0] == weight_shape[1]
            return ("old", a1[0]) if (a2[0] == weight_shape[0] and square) else ("new", a2[0])
        return ("old", a1[0]) if a1[0] <= a2[0] else ("new", a2[0])
    if new:
        return "new", a2[0]
    if old:
        return "old", a1[0]
    raise ShapeMismatch("(glora)", tuple(b2), tuple(a2), key=_B2,
                        detail="a1/a2/b1/b2 shapes fit neither GLoRA orientation")


class _GLoRABuild:
    """GLoRA (new layout, linear / 1×1 conv) for :mod:`.rebuild` at scale ``k = m·γ``:
    ``W′ = W + k·[W·A1 | B1]·[A2 ; B2]`` — one ``addmm`` of rank 2r on the flattened weight (``W·A1``
    is out×r). Backward by hand from ``E = ∂L/∂W′``: ``E·[A2 ; B2]ᵀ = [∂(W·A1) | ∂B1]/k`` and
    ``[W·A1 | B1]ᵀ·E = [∂A2 ; ∂B2]/k`` (two skinny GEMMs), ``∂A1 = Wᵀ·∂(W·A1)``."""

    def __init__(self, k: float):
        self.k = k

    def _add(self, w2, left, right):
        """``W + k·left·right``: on CUDA bf16/fp16 one Triton pass (read W, write W′; ``addmm`` first copies
        W into its output: 4 weight-sized passes), else ``addmm``. Both accumulate in fp32 and round once."""
        if lowrank_triton.usable(w2, left.shape[1]):
            return lowrank_triton.add_lowrank(w2, left, right, self.k)
        return torch.addmm(w2, left, right, alpha=self.k)

    def _parts(self, w, a1, a2, b1, b2):
        w2 = w if w.dim() == 2 else flat(w)
        dt = w.dtype
        # the fp32 factors as views of one cast of their storage per step inside the op (casts.cast_factor)
        a1f, a2f, b1f, b2f = (cast_factor(t, dt).reshape(t.shape[0], -1) for t in (a1, a2, b1, b2))
        left = torch.cat([w2 @ a1f, b1f], dim=1)     # (out, 2r)
        right = torch.cat([a2f, b2f], dim=0)         # (2r, in)
        return w2, a1f, left, right

    def __call__(self, w, b, a1, a2, b1, b2):
        w2, _, left, right = self._parts(w, a1, a2, b1, b2)
        return like(torch.addmm(w2, left, right, alpha=self.k), w.shape, w.dtype), b

    def forward_aux(self, w, b, *theta):
        """W′, and the two rank-2r factors kept for backward (out×2r and 2r×in: small), so that the
        backward neither recomputes ``W·A1`` (a GEMM reading W) nor the two concatenations. GPU runs 36–37
        (H100, SD1.5 b8, ``results/run37_h100_glora_keep/``): 5910 → 5328 kernels per step, one-graph step
        81.5 → 79.8 ms (LyCORIS 97.9)."""
        w2, _, left, right = self._parts(w, *theta)
        return like(self._add(w2, left, right), w.shape, w.dtype), b, (left, right)

    def recompute(self, keep, w, b, *theta):
        left, right = keep
        w2 = w if w.dim() == 2 else flat(w)
        return like(self._add(w2, left, right), w.shape, w.dtype), (w2, left, right)

    def vjp(self, aux, theta, gw, gb, needs):
        w2, left, right = aux
        a1, a2, b1, b2 = theta
        e = like(gw, w2.shape, w2.dtype)
        r = a2.shape[0]
        # k·(a·b) as one GEMM (alpha = k, beta = 0: the 0-d input is never read, and addmm copies it into
        # the output only for beta ≠ 0): no separate scaling kernel, and the product rounded once
        zero = e.new_empty(())
        gl = torch.addmm(zero, e, right.t(), beta=0, alpha=self.k)    # (out, 2r): ∂(W·A1) | ∂B1
        gr = torch.addmm(zero, left.t(), e, beta=0, alpha=self.k)     # (2r, in): ∂A2 ; ∂B2
        ga1 = like(w2.t() @ gl[:, :r], a1.shape, a1.dtype) if needs[0] else None
        ga2 = like(gr[:r], a2.shape, a2.dtype) if needs[1] else None
        gb1 = like(gl[:, r:], b1.shape, b1.dtype) if needs[2] else None
        gb2 = like(gr[r:], b2.shape, b2.dtype) if needs[3] else None
        return ga1, ga2, gb1, gb2


@register
class GLoRA(Algorithm):
    name = "glora"
    keys = frozenset({_A1, _A2, _B1, _B2, "bm.weight", "alpha", "scalar"})
    detect_keys = (_A1,)
    options = {"use_scalar": False}
    weight_independent = False
    supports_dora = True  # ComfyUI applies dora_scale to GLoRA like to any adapter

    def supports(self, spec):
        return spec.kind in self.kinds and spec.groups == 1

    def create(self, spec, opts, weight=None, generator=None) -> Tensors:
        if spec.groups != 1:
            raise ConfigError("glora: grouped convolutions are not supported")
        r = int(opts["rank"])
        if len(spec.weight_shape) > 1 and spec.out_dim == spec.in_dim == r:
            raise ConfigError(
                f"glora: rank {r} equal to the layer width {r} makes the file ambiguous "
                "(A1111/ComfyUI would read it as pre-3.0 GLoRA); choose another rank")
        alpha = opts.get("alpha")
        alpha = float(r if alpha in (None, 0) else alpha)
        shapes = glora_shapes(spec, r)
        t: Tensors = {_A1: _kaiming(shapes[_A1], generator), _B1: _kaiming(shapes[_B1], generator)}
        if opts.get("use_scalar"):
            t[_A2] = _kaiming(shapes[_A2], generator)
            t[_B2] = _kaiming(shapes[_B2], generator)
            t["scalar"] = torch.zeros((), dtype=torch.float32)
        else:
            t[_A2] = torch.zeros(shapes[_A2], dtype=torch.float32)
            t[_B2] = torch.zeros(shapes[_B2], dtype=torch.float32)
        t["alpha"] = alpha_tensor(alpha)  # raw, as LyCORIS writes it
        return t

    def rank(self, t):
        return int(glora_layout(t)[1])

    def _gain(self, t, rank: int):
        g = alpha_scale(t, rank)
        s = t.get("scalar")
        return s * g if s is not None else g

    def delta_weight(self, t, spec, weight=None):
        if weight is None:
            raise ValueError("GLoRA needs the base weight (ΔW = γ·(W·A1·A2 + B1·B2))")
        layout, r = glora_layout(t, spec.weight_shape)
        a1, a2, b1, b2 = (flat(t[k]) for k in (_A1, _A2, _B1, _B2))
        w = weight.to(a1.dtype) if weight.dtype != a1.dtype else weight
        if layout == "old":
            # ComfyUI's pre-3.0 formula on flattened tensors: b2·b1 + W·a2·a1
            dw = b2 @ b1 + (flat(w) @ a2) @ a1
            if dw.numel() != math.prod(spec.weight_shape):
                raise ShapeMismatch("(glora)", tuple(dw.shape), spec.weight_shape, key=_A1,
                                    detail="pre-3.0 GLoRA tensors do not fit this layer")
            dw = dw.reshape(spec.weight_shape)
        else:
            wa = torch.einsum("oi...,ir,rj->oj...", w, a1, a2)  # contracts the input axis, keeps k
            dw = wa + (b1 @ b2).reshape(spec.weight_shape)
        return dw * self._gain(t, r)

    def forward_delta(self, x, t, spec, weight, bias, base_out):
        layout, r = glora_layout(t, spec.weight_shape)
        if layout == "old" or spec.groups != 1:
            # legacy orientation: materialise (read-only path, not worth a structured form)
            return layer_op(x, spec, self.delta_weight(t, spec, weight).to(x.dtype))
        a1, a2, b1, b2 = (t[k].to(x.dtype) for k in (_A1, _A2, _B1, _B2))
        gain = self._gain(t, r)
        if spec.kind == LINEAR:
            ax = F.linear(F.linear(x, a2), a1)
            bx = F.linear(F.linear(x, b2), b1)
        else:
            conv = _CONV_FN[spec.kind]
            ax = conv(conv(x, a2), a1)           # 1×1 channel mixing, same spatial size as x
            bx = conv(layer_op(x, spec, b2), b1)  # b2 with the layer's stride/padding/dilation
        # W(x + γA(x)) − Wx = γ·op(A(x), W) without the bias (it is in base_out once already)
        return (layer_op(ax, spec, weight.to(x.dtype)) + bx) * gain

    def forward_accumulate(self, acc, x, t, spec, weight, bias, base_out, multiplier, inplace=False):
        """Linear, new layout: ``acc + mγ·(A(x)·Wᵀ + B(x))`` as two GEMMs that each add into the
        result (the first in place when allowed), the scale in their alpha."""
        if spec.kind != LINEAR:
            return super().forward_accumulate(acc, x, t, spec, weight, bias, base_out, multiplier, inplace)
        layout, r = glora_layout(t, spec.weight_shape)
        gain = self._gain(t, r)
        if layout == "old" or isinstance(gain, torch.Tensor):
            return super().forward_accumulate(acc, x, t, spec, weight, bias, base_out, multiplier, inplace)
        a1, a2, b1, b2 = (t[k].to(x.dtype) for k in (_A1, _A2, _B1, _B2))
        s = gain * multiplier
        ax = F.linear(F.linear(x, a2), a1)
        out = accumulate_linear(acc, ax, weight.to(x.dtype), s, inplace)
        return accumulate_linear(out, F.linear(x, b2), b1, s, inplace or out is not acc)

    # -- rebuild path ---------------------------------------------------------------------
    def prefers_rebuild_for(self, t, spec):
        # Decision (GPU run 6, H200, SD1.5 b8, ``lin`` layers): the bypass runs a second full-size GEMM
        # per layer (γ·op(A(x), W)) forward and two backward; the rebuilt op builds
        # W′ = W + mγ·(W·A1·A2 + B1·B2) from weight-sized products and pays one weight-gradient GEMM:
        # one-graph device time 87.3 vs 95.0 ms (LyCORIS 91.5), peak 8.65 vs 9.06 GiB (LyCORIS 9.18).
        return rebuild_supports(spec)

    #: whether the steps that take the bypass op run GLoRA there as a rank-2r LoRA (:meth:`bypass_op`);
    #: ``LYCO_GLORA_OP=0`` turns it off (a diagnostic switch for A/B runs)
    op_over_rebuild = os.environ.get("LYCO_GLORA_OP", "1") != "0"

    def _op_form(self, t, spec) -> float | None:
        """γ where this layer has the bypass op's form (new layout, a float γ, a linear layer or 1×1 conv), else
        None."""
        if spec.kernel_numel != 1 or spec.groups != 1 or spec.kind not in (LINEAR, CONV2D):
            return None
        layout, r = glora_layout(t, spec.weight_shape)
        gain = self._gain(t, r)
        return None if layout == "old" or isinstance(gain, torch.Tensor) else float(gain)

    def prefers_op_over_rebuild(self, t, spec, x):
        return self._op_form(t, spec) is not None

    def bypass_op(self, x, t, spec, weight, bias, multiplier):
        """``ΔW = γ·(W·A1·A2 + B1·B2) = γ·[W·A1 | B1]·[A2 ; B2]``: a rank-2r product whose up depends on the frozen W
        — :mod:`.lowrank`'s bypass op with ``U = [W·A1 | B1]`` (out × 2r, built here under autograd: one GEMM
        reading W, so ∂A1 = Wᵀ·∂(W·A1) by autograd) and ``D = [A2 ; B2]``. The op's backward needs no
        weight-sized gradient: the rebuilt op (:class:`_GLoRABuild`) pays a weight-gradient GEMM per layer. Taken
        in the steps that take the op (the layer host asks :meth:`prefers_op_over_rebuild` where ``mode = "auto"``
        rebuilds); the rebuilt op elsewhere. Measured (run 154, H100, SD1.5 b8 ``glora`` as one CUDA graph, A/B/A
        against ``LYCO_GLORA_OP=0``): 77.00 / 77.69 / 76.91 ms, peak 8.76 against 8.70 GiB (h kept per layer;
        LyCORIS 9.38 in run 155). Less than the weight gradients it drops (a LoRA of the same rank runs 73.3 ms):
        each layer builds U and D and splits their gradients (by the code: five small kernels forward, casts and
        gradient accumulations backward — not profiled), and the q/k/v group (:mod:`..siblings`) does not take
        these layers."""
        gain = self._op_form(t, spec)
        if gain is None:
            return None
        cd = lowrank._compute_dtype(x)  # the dtype the op computes in (autocast's where it is on)
        w2 = (weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)).to(cd)
        a1, b1 = (flat(t[k]).to(cd) for k in (_A1, _B1))
        up = torch.cat([w2 @ a1, b1], dim=1)
        down = torch.cat([t[_A2], t[_B2]], dim=0)
        return lowrank.bypass_op(x, spec, weight, bias, down, up, gain * multiplier)

    def rebuild_op(self, x, t, spec, weight, bias, multiplier):
        """New layout, float scale, linear or 1×1 conv: :class:`_GLoRABuild` (its own backward);
        otherwise the shared rebuilt op over :meth:`merged`."""
        layout, r = glora_layout(t, spec.weight_shape)
        gain = self._gain(t, r)
        if layout == "new" and not isinstance(gain, torch.Tensor) and spec.kernel_numel == 1 and spec.groups == 1:
            return rebuilt_op(x, spec, weight, bias, _GLoRABuild(gain * float(multiplier)),
                              *(t[k] for k in (_A1, _A2, _B1, _B2)))
        return super().rebuild_op(x, t, spec, weight, bias, multiplier)

    def export(self, t):
        out = {k: v for k, v in t.items() if k != "scalar"}
        if "scalar" in t:
            out[_A2] = t[_A2] * t["scalar"]
            out[_B2] = t[_B2] * t["scalar"]
        return out

    def describe(self, t):
        layout, r = glora_layout(t)
        return {"rank": int(r), "alpha": scalar_of(t), "scale": alpha_scale(t, int(r)), "layout": layout}

"""Full ("native fine-tuning"): the adapter *is* the weight delta.

File tensors (LyCORIS/kohya, read by A1111, ComfyUI and InvokeAI):
  ``diff``    ΔW, same shape as the layer's weight;
  ``diff_b``  Δb, same shape as the bias (optional).
No alpha, no scale: ``W' = W + m·diff``, ``b' = b + m·diff_b`` (LyCORIS merge, A1111
``network_full``, ComfyUI ``diff`` patches all agree).

LyCORIS trains the absolute weight and writes ``weight − W_orig`` at save time; we train the
difference directly, which is the same function and the same file. ``create`` therefore starts
from zeros (ΔW = 0). Layers: linear, conv1d/2d/3d, and LayerNorm/GroupNorm (A1111 and ComfyUI
apply ``diff`` to any weight; LyCORIS itself only wraps linear/conv with ``full``).
"""

from __future__ import annotations

import torch

from .base import (
    CONV1D, CONV2D, CONV3D, GROUPNORM, LAYERNORM, LINEAR, Algorithm, Tensors, layer_op, register,
)
from .rebuild import like, rebuilt_op


class _FullBuild:
    """Full for :mod:`.rebuild` at multiplier ``m``: ``W′ = W + m·diff`` and ``b′ = b + m·diff_b`` (one
    fused add each). Autograd would keep ``W′`` for backward (a weight-sized tensor per layer: 0.5 GiB
    over SD1.5's attention/MLP linears in bf16); the rebuilt op keeps x and rebuilds it. Backward by
    hand: ``∂diff = m·∂W′``, ``∂diff_b = m·∂b′``."""

    def __init__(self, m: float, has_db: bool):
        self.m, self.bias_grad = m, has_db

    def __call__(self, w, b, diff, diff_b=None):
        w2 = torch.add(w, like(diff, w.shape, w.dtype), alpha=self.m)
        if diff_b is None:
            return w2, b
        return w2, torch.add(b, like(diff_b, b.shape, b.dtype), alpha=self.m)

    def forward_aux(self, w, b, *theta):
        return self(w, b, *theta) + ((),)

    def recompute(self, keep, w, b, diff, diff_b=None):
        return torch.add(w, like(diff, w.shape, w.dtype), alpha=self.m), None

    def vjp(self, aux, theta, gw, gb, needs):
        diff = theta[0]
        gd = like(gw * self.m if self.m != 1.0 else gw, diff.shape, diff.dtype) if needs[0] else None
        if len(theta) == 1:
            return (gd,)
        db = theta[1]
        gdb = like(gb * self.m if self.m != 1.0 else gb, db.shape, db.dtype) if needs[1] else None
        return gd, gdb


def full_delta_weight(diff: torch.Tensor, weight_shape) -> torch.Tensor:
    """``diff`` in the layer's layout (a linear↔1×1-conv difference in trailing 1s is reshaped)."""
    if tuple(diff.shape) != tuple(weight_shape):
        return diff.reshape(weight_shape)
    return diff


@register
class Full(Algorithm):
    name = "full"
    keys = frozenset({"diff", "diff_b"})
    detect_keys = ("diff",)
    frozen_keys = frozenset()  # no alpha: every tensor is trained
    kinds = (LINEAR, CONV1D, CONV2D, CONV3D, LAYERNORM, GROUPNORM)
    # bypass = a second full-size GEMM forward (and two backward); op(x, W + m·diff) = one of each
    prefers_rebuild = True

    def create(self, spec, opts, weight=None, generator=None) -> Tensors:
        t: Tensors = {"diff": torch.zeros(spec.weight_shape, dtype=torch.float32)}
        if spec.has_bias:
            # a norm's bias has its weight's shape
            bias_shape = spec.weight_shape if spec.is_norm else (spec.out_dim,)
            t["diff_b"] = torch.zeros(bias_shape, dtype=torch.float32)
        return t

    def scale(self, t):
        return 1.0

    def delta_weight(self, t, spec, weight=None):
        return full_delta_weight(t["diff"], spec.weight_shape)

    def delta_bias(self, t, spec, bias=None):
        # Decision: a ``diff_b`` for a bias-free layer is ignored, as LyCORIS's merge and ComfyUI
        # (whose patch finds no ``bias`` key) do; only A1111 would create a new bias for it.
        db = t.get("diff_b")
        if db is None or not spec.has_bias:
            return None
        return db.reshape(spec.weight_shape if spec.is_norm else (spec.out_dim,))

    def merged(self, t, spec, weight, bias, multiplier):
        """``W + m·diff`` (and ``b + m·diff_b``) as one fused op each (the rebuild fast path)."""
        w2 = torch.add(weight, self.delta_weight(t, spec).to(weight.dtype), alpha=multiplier)
        db = self.delta_bias(t, spec, bias)
        if db is None:
            return w2, bias
        b0 = bias if bias is not None else torch.zeros_like(db)
        return w2, torch.add(b0, db.to(b0.dtype), alpha=multiplier)

    def rebuild_op(self, x, t, spec, weight, bias, multiplier):
        """Linear and zero-padded conv layers: the shared rebuilt op with :class:`_FullBuild` (the merged
        weight is not kept for backward); norms: the host's ``layer_op`` on :meth:`merged`."""
        db = t.get("diff_b") if (spec.has_bias and bias is not None) else None
        theta = (t["diff"],) if db is None else (t["diff"], db)
        return rebuilt_op(x, spec, weight, bias, _FullBuild(float(multiplier), db is not None), *theta)

    def forward_delta(self, x, t, spec, weight, bias, base_out):
        # op is linear in (W, b): Δy = op(x, diff, diff_b) (for a norm: normalize(x)·diff + diff_b).
        dw = self.delta_weight(t, spec).to(x.dtype)
        db = self.delta_bias(t, spec)
        return layer_op(x, spec, dw, None if db is None else db.to(x.dtype))

    def describe(self, t):
        return {"rank": None, "alpha": None, "scale": 1.0, "bias": "diff_b" in t}

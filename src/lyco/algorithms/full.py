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
import torch.nn.functional as F

from .base import (
    CONV1D, CONV2D, CONV3D, GROUPNORM, LAYERNORM, LINEAR, Algorithm, Tensors, layer_op, register,
)


class _FullLinear(torch.autograd.Function):
    """``F.linear(x, W + m·diff, b + m·diff_b)`` that does not keep ``W + m·diff`` for backward:
    autograd would save the merged weight (a weight-sized tensor per layer, 0.5 GiB over SD1.5's
    attention/MLP linears in bf16); here it is recomputed in backward (one weight-sized add) from
    ``W`` and ``diff``, which are alive anyway. Gradients: x, diff, diff_b (the base is frozen)."""

    @staticmethod
    def forward(ctx, x, weight, diff, bias, diff_b, m):
        w2 = torch.add(weight, diff.to(weight.dtype), alpha=m).to(x.dtype)
        b2 = None
        if bias is not None:
            b2 = bias if diff_b is None else torch.add(bias, diff_b.to(bias.dtype), alpha=m)
            b2 = b2.to(x.dtype)
        elif diff_b is not None:
            b2 = (diff_b * m).to(x.dtype)
        ctx.save_for_backward(x, weight, diff)
        ctx.m = m
        ctx.has_db = diff_b is not None
        ctx.db_dtype = diff_b.dtype if diff_b is not None else None
        return F.linear(x, w2, b2)

    @staticmethod
    def backward(ctx, grad):
        x, weight, diff = ctx.saved_tensors
        m = ctx.m
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = gdiff = gdb = None
        # Under autocast the forward GEMM ran in the autocast dtype while ``x`` was saved as it came
        # (e.g. fp32): do the backward GEMMs in the gradient's dtype, hand each gradient back in
        # its input's dtype.
        if ctx.needs_input_grad[0]:
            w2 = torch.add(weight, diff.to(weight.dtype), alpha=m).to(grad.dtype)
            gx = (g2 @ w2).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[2]:
            gdiff = torch.mm(g2.t(), x.reshape(-1, x.shape[-1]).to(g2.dtype))
            if m != 1.0:
                gdiff = gdiff * m
            gdiff = gdiff.to(diff.dtype)
        if ctx.has_db and ctx.needs_input_grad[4]:
            gdb = g2.sum(0)
            if m != 1.0:
                gdb = gdb * m
            gdb = gdb.to(ctx.db_dtype)
        return gx, None, gdiff, None, gdb, None


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
        """Linear layers: :class:`_FullLinear` (the merged weight is not kept for backward); convs:
        the shared rebuilt op (same idea, through autograd of ``merged``)."""
        diff = t["diff"]
        if (spec.kind != LINEAR or weight.requires_grad or tuple(diff.shape) != tuple(weight.shape)
                or (bias is not None and bias.requires_grad) or x.dim() < 1):
            return super().rebuild_op(x, t, spec, weight, bias, multiplier)
        db = t.get("diff_b") if spec.has_bias else None
        return _FullLinear.apply(x, weight, diff, bias, db, float(multiplier))

    def forward_delta(self, x, t, spec, weight, bias, base_out):
        # op is linear in (W, b): Δy = op(x, diff, diff_b) (for a norm: normalize(x)·diff + diff_b).
        dw = self.delta_weight(t, spec).to(x.dtype)
        db = self.delta_bias(t, spec)
        return layer_op(x, spec, dw, None if db is None else db.to(x.dtype))

    def describe(self, t):
        return {"rank": None, "alpha": None, "scale": 1.0, "bias": "diff_b" in t}

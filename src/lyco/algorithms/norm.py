"""Norm: additive deltas on the affine parameters of LayerNorm / GroupNorm.

File tensors: ``w_norm (C,)`` (Δ weight, detection key) and ``b_norm (C,)`` (Δ bias). No alpha.
``w' = w + m·w_norm``, ``b' = b + m·b_norm`` (LyCORIS ``NormModule``, A1111 ``network_norm``,
ComfyUI ``norm`` patches). The bypass path is ``normalize(x)·w_norm + b_norm`` = ``op(x, w_norm,
b_norm)``, because the norm's output is linear in its affine parameters.

Decision: A1111 only accepts a module that carries *both* ``w_norm`` and ``b_norm``. We create
``b_norm`` for layers with a bias (the usual case) and, on export, write a zero ``b_norm`` for a
bias-free norm, so every file loads there. A ``b_norm`` on a bias-free layer is ignored when
reading (as LyCORIS and ComfyUI do; A1111 alone would create a bias), so that zero ``b_norm`` is an
exact no-op.
"""

from __future__ import annotations

import torch

from .base import GROUPNORM, LAYERNORM, Algorithm, Tensors, layer_op, register


@register
class Norm(Algorithm):
    name = "norm"
    keys = frozenset({"w_norm", "b_norm"})
    detect_keys = ("w_norm",)
    frozen_keys = frozenset()  # no alpha
    kinds = (LAYERNORM, GROUPNORM)

    def create(self, spec, opts, weight=None, generator=None) -> Tensors:
        # the weight's shape: (C,) for GroupNorm and the usual LayerNorm (a multi-axis LayerNorm gets
        # its normalized_shape, which LyCORIS cannot express)
        shape = tuple(spec.weight_shape)
        t: Tensors = {"w_norm": torch.zeros(shape, dtype=torch.float32)}
        if spec.has_bias:
            t["b_norm"] = torch.zeros(shape, dtype=torch.float32)
        return t

    def scale(self, t):
        return 1.0

    def delta_weight(self, t, spec, weight=None):
        return t["w_norm"].reshape(spec.weight_shape)

    def delta_bias(self, t, spec, bias=None):
        b = t.get("b_norm")
        if b is None or not spec.has_bias:  # bias-free layer: ignored (see module doc)
            return None
        return b.reshape(spec.weight_shape)  # a norm's bias has its weight's shape

    def forward_delta(self, x, t, spec, weight, bias, base_out):
        b = self.delta_bias(t, spec)
        w = self.delta_weight(t, spec).to(x.dtype)
        return layer_op(x, spec, w, None if b is None else b.to(x.dtype))

    def export(self, t):
        out = {k: v for k, v in t.items()}
        if "b_norm" not in out:
            out["b_norm"] = torch.zeros_like(out["w_norm"])  # A1111 needs both keys
        return out

    def describe(self, t):
        return {"rank": None, "alpha": None, "scale": 1.0}

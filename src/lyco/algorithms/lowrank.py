"""The rebuild path's op for low-rank deltas: ``y = op(x, W + s·U·D, b)`` with a factored backward,
for every adapter whose delta is a product ``ΔW = γ·U·D`` (LoRA/LoCon, DyLoRA outside training, and
LoHa through its Khatri–Rao form, a LoRA of rank r1·r2). ``mode = "rebuild"`` takes it.

``D`` is ``(r, in)`` or a conv kernel ``(r, in, *k)`` that carries the layer's stride, padding and
dilation; ``U`` is ``(out, r)`` (or ``(out, r, 1…)``); ``s = m·γ`` is a Python number.

Against the generic rebuilt op of :mod:`.rebuild` (``∂W′ = ∂yᵀx`` — one weight-gradient GEMM, as
full fine-tuning pays — then ``∂θ`` by a nested autograd pass through ``merged``) the adapter's
gradients come from the factors: ``h = D∗x`` (recomputed in backward: one read of x),
``∂U = s·∂yᵀh``, ``∂D = s·(Uᵀ∂y)ᵀx`` — three skinny products that read ∂y and x, no weight-sized
gradient, no autograd re-entry — and ``∂x = opᵀ(∂y, W + s·U·D)``, the frozen layer's own input
gradient with the merged weight (one weight-sized ``addmm`` to rebuild it). Only x and the factors are
kept for backward, never ``W′`` (as in :mod:`.rebuild`).

Numerics, as every rebuild: ``W + s·U·D`` is rounded once to the compute dtype (bf16: 2⁻⁹ relative per
element), so deltas far below that vanish from the forward (what LyCORIS's default non-bypass
training does); that is why ``mode = "auto"`` keeps these algorithms on the delta path. The gradients
of U and D never see the merge.

What was measured and rejected (benchmarks/NOTES.md, runs 10–11): running the *exact* bypass forward
``f(x) + s·U·h`` through an op like this one (merged weight only for ∂x) saved ≈ 1 ms of device time
per SD1.5 b8 step but its Python backward cost more host time than autograd's C++ nodes (eager LoCon
and LoHa steps 10–20 % slower); a Triton kernel fusing the adapter into the frozen GEMM lost to cuBLAS.

Under ``torch.compile`` the op is not used; with autograd disabled the forward runs without the
Function. Autocast: the compute dtype is the one autocast would pick for ``op(x, W)``; every operand is
cast to it explicitly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LINEAR, LayerSpec, layer_op
from .rebuild import cast, like, op_backward, supports as rebuild_supports

#: one cheap call to skip the per-device autocast queries in the common case (no autocast anywhere)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def supports(spec: LayerSpec, x: torch.Tensor) -> bool:
    """What :mod:`.rebuild` computes itself (linear; convs with integer zero padding), ungrouped convs
    on batched input only (the factors' conv layout has no groups)."""
    if not rebuild_supports(spec):
        return False
    if spec.kind == LINEAR:
        return x.shape[-1] == spec.in_dim
    return spec.groups == 1 and x.dim() == len(spec.kernel) + 2


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``op(x, W)`` computes in: autocast's for a float32/16 input under autocast, else x's."""
    if _any_autocast() and x.dtype != torch.float64 and x.is_floating_point():
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    return x.dtype


def _merged(w: torch.Tensor, u2: torch.Tensor, d2: torch.Tensor, s: float, dtype: torch.dtype) -> torch.Tensor:
    """``W + s·U·D`` in ``dtype`` (one GEMM; the GEMM accumulates in fp32 and rounds once)."""
    wf = cast(w, dtype)
    if wf.dim() == 2:
        return torch.addmm(wf, u2, d2, alpha=s)
    return torch.addmm(wf.reshape(wf.shape[0], -1), u2, d2, alpha=s).view(w.shape)


def _factors(down: torch.Tensor, up: torch.Tensor, dtype: torch.dtype):
    """(D in its layer layout, U as (out, r), D as (r, in·∏k)), all in ``dtype``."""
    r = down.shape[0]
    dd, ud = cast(down, dtype), cast(up, dtype)
    u2 = ud if ud.dim() == 2 else ud.reshape(ud.shape[0], r)
    d2 = dd if dd.dim() == 2 else dd.reshape(r, -1)
    return dd, u2, d2


def _forward(x, spec: LayerSpec, s: float, weight, bias, down, up, cd):
    """``op(x, W + s·U·D, b)`` in the compute dtype ``cd``, x 2-D for a linear layer."""
    xd, wd, bd = cast(x, cd), cast(weight, cd), cast(bias, cd)
    _, u2, d2 = _factors(down, up, cd)
    return layer_op(xd, spec, _merged(wd, u2, d2, s, cd), bd), xd


class _LowRankOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cfg, weight, bias, down, up):
        spec, s, cd = cfg
        y, xd = _forward(x, spec, s, weight, bias, down, up, cd)
        ctx.cfg = (spec, s, x.shape, x.dtype)
        ctx.save_for_backward(xd, weight, bias, down, up)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        xd, weight, bias, down, up = ctx.saved_tensors
        spec, s, xshape, xdt = ctx.cfg
        need_x, _, need_w, need_b, need_d, need_u = ctx.needs_input_grad  # (x, cfg, weight, bias, down, up)
        cd = gy.dtype
        r = down.shape[0]
        dd, u2, d2 = _factors(down, up, cd)
        xc = cast(xd, cd)
        gx = gw = gb = gd = gu = None
        if need_x or need_w or need_b:
            w_in = _merged(weight, u2, d2, s, cd) if need_x else cast(weight, cd)
            gx, gw, gb = op_backward(spec, xc, w_in, gy, need_x, need_w, need_b)
        if need_d or need_u:
            if spec.kind == LINEAR:  # 2-D x and ∂y (lowrank_op flattens the leading dims outside)
                if need_u:
                    gu = gy.t() @ F.linear(xc, d2)
                    if s != 1.0:
                        gu.mul_(s)
                if need_d:
                    gd = (gy @ u2).t() @ xc
                    if s != 1.0:
                        gd.mul_(s)
            else:
                n, o = gy.shape[0], gy.shape[1]
                g3 = gy.reshape(n, o, -1)
                if need_u:
                    h = layer_op(xc, spec, dd)
                    gu = torch.bmm(g3, h.reshape(n, r, -1).transpose(1, 2)).sum(0)
                    if s != 1.0:
                        gu.mul_(s)
                if need_d:
                    gh = torch.matmul(u2.t(), g3)  # (n, r, L): ∂h/s
                    if s != 1.0:
                        gh.mul_(s)
                    gd = op_backward(spec, xc, dd, gh.view((n, r) + tuple(gy.shape[2:])), False, True, False)[1]
        if gx is not None:
            gx = like(gx, xshape, xdt)
        if gw is not None:
            gw = like(gw, weight.shape, weight.dtype)
        if gb is not None:
            gb = cast(gb, bias.dtype)
        if gd is not None:
            gd = like(gd, down.shape, down.dtype)
        if gu is not None:
            gu = like(gu, up.shape, up.dtype)
        return gx, None, gw, gb, gd, gu


def lowrank_op(x: torch.Tensor, spec: LayerSpec, weight: torch.Tensor, bias: torch.Tensor | None,
               down: torch.Tensor, up: torch.Tensor, s: float) -> torch.Tensor | None:
    """``op(x, W + s·U·D, b)`` with the backward described in the module doc; None where the layer is
    not supported (the caller takes another path)."""
    if not supports(spec, x) or torch.compiler.is_compiling():
        return None
    cd = _compute_dtype(x)
    lead = None
    if spec.kind == LINEAR and x.dim() != 2:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad or down.requires_grad
                                           or up.requires_grad or (bias is not None and bias.requires_grad)):
        y = _forward(x, spec, float(s), weight, bias, down, up, cd)[0]
    else:
        y = _LowRankOp.apply(x, (spec, float(s), cd), weight, bias, down, up)
    return y if lead is None else y.view(*lead, y.shape[-1])

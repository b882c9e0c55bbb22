"""One op for several low-rank adapted linear layers that read **the same input** — a self-attention block's
q, k and v (``to_q``/``to_k``/``to_v`` of diffusers' ``Attention``, ``q_proj``/``k_proj``/``v_proj`` of CLIP),
a cross-attention's k and v on the text states — as :mod:`.lowrank`'s bypass op computes each of them:
``y_i = x·W_iᵀ + b_i + s_i·U_i·(D_i·x)``, the same sums, with the work the members share done once.

Per member the bypass op reads x for its down ``h_i = D_i·x`` and again in backward for ``∂D_i``, and autograd sums
the members' ∂x (two adds of an input-sized tensor for three members: read two, write one). Here:

* forward: ``h = [D_0; D_1; …]·x`` — one GEMM, x read once for all downs — then each member's frozen GEMM and an
  in-place ``y_i += s_i·U_i·h_i`` (as the bypass op). Tried and taken out: writing ``[x | s·h]`` once and letting
  each member's frozen GEMM take its up along (``y_i = [x | s·h]·[W_i | 0 | U_i]ᵀ + b_i``: one copy of x for the
  group instead of two output-sized passes per member) — H100 run 127, SD1.5 b8 LoRA as one graph: 74.94 ms
  with it and without (benchmarks/NOTES.md change 89). Where every member's layer takes the fused GEMM
  (:func:`.lowrank._fused_gemm`: many rows, narrow layers), each member is one such launch instead, its down
  accumulated in its own frozen product's k-loop and written into its columns of the group's h (change 91). In
  captured steps (``LYCO_FORWARD_MERGED``, :func:`.lowrank._fwd_weights`, change 133) each member's frozen GEMM
  runs through its merged weight ``W_i + s_i·U_i·D_i`` instead, all three built a layer ahead on the up stream, and
  no up follows.
* backward: ``∂x = Σ_i ∂y_i·(W_i + s_i·U_i·D_i)`` as GEMMs adding into one tensor (``beta = 1``) — no autograd
  sum; ``∂h_i = s_i·∂y_i·U_i`` side by side in one tensor and ``∂D = ∂hᵀ·x`` one GEMM for all members (x read
  once), ``∂U_i = s_i·∂y_iᵀ·h_i`` per member — on the side stream (:func:`.lowrank.side_stream`) beside ∂x, as
  the bypass op's own products.

Kept for backward: x and h — what each member's bypass op kept, once; x's makings instead of x where its producer
keeps them anyway (:mod:`.regen`: a transformer block's norm1 output, in captured steps). The members' outputs are
separate tensors (one autograd node with several outputs: its backward runs when all their gradients are in;
an output nobody used gets none and contributes nothing).

Which layers form a group and how the layer hosts hand one op's outputs to its members: :mod:`lyco.siblings`.
Under ``torch.compile`` and with autograd off the hosts do not group. benchmarks/NOTES.md change 89.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import regen, regen_triton
from .base import LINEAR
from .casts import cast_factor, cast_input
from .lowrank import (
    _FWD_MAX_RANK, _SUNK, _ahead_link, _ahead_take, _fork, _forward_side, _fused_gemm, _fwd_merged_on, _fwd_reset,
    _fwd_weights, _join, _late_join, _late_on, _late_wait, _merged, _merged_pays, _mm, _out_dtype_ok, _weak_build,
    _regen_operands, _side_products, _sink_add, _sink_grad, _sink_into, _sink_leaves, side_stream, up_stream,
)
from .lowrank_gemm import fused_linear, supports as fused_supports
from .rebuild import cast, like


def supports(x: torch.Tensor, parts) -> bool:
    """2-D rows, every member a linear layer over x's width with a frozen weight and bias, a ``(r, in)`` down."""
    if x.dim() != 2 or len(parts) < 2:
        return False
    for spec, w, b, d, u, _ in parts:
        if (spec.kind != LINEAR or spec.in_dim != x.shape[1] or w.requires_grad or (b is not None and b.requires_grad)
                or d.dim() != 2 or u.dim() != 2 or d.shape[1] != x.shape[1] or u.shape[1] != d.shape[0]):
            return False
    return True


def _fused_members(xs, specs, ws, bs, dd, ud, rs, offs, cd):
    """``(h, [(W, b, h_i)])`` where every member's forward can be :func:`.lowrank_gemm.fused_linear` (h the group's
    ``(rows, Σ r)``, h_i member i's columns of it), else None."""
    if not all(_fused_gemm(xs, sp, r) for sp, r in zip(specs, rs)):
        return None
    h = xs.new_empty((xs.shape[0], sum(rs)))
    parts = [(cast(w, cd), cast(b, cd), h[:, o:o + r]) for w, b, o, r in zip(ws, bs, offs, rs)]
    if not all(fused_supports(xs, w, b, d, u, hs) for (w, b, hs), d, u in zip(parts, dd, ud)):
        return None
    return h, parts


def _merged_group(ss, cd, *flat) -> list:
    """Every member's ``W_i + s_i·U_i·D_i`` in ``cd`` from the op's flat ``(W, b, D, U)`` per member, the factors cast
    here (the forward's weights built ahead, :func:`.lowrank._fwd_weights`)."""
    return _merged_all(flat[0::4], [cast_factor(u, cd) for u in flat[3::4]], [cast_factor(d, cd) for d in flat[2::4]],
                       ss, cd)


def _merged_all(ws, ud, dd, ss, cd) -> list:
    """Every member's ``W_i + s_i·U_i·D_i`` (the group's ∂x weights, :func:`.lowrank._ahead_link`)."""
    return [_merged(w, u, d, s, cd) for w, u, d, s in zip(ws, ud, dd, ss)]


class _SharedOp(torch.autograd.Function):
    """Outputs ``y_i`` of every member (module doc). Inputs: ``x``, the configuration, then per member
    ``(W, b, D, U)``."""

    @staticmethod
    def forward(ctx, x, cfg, *flat):
        specs, ss, cd = cfg
        n = len(specs)
        ws, bs = flat[0::4], flat[1::4]
        dd = [cast_factor(d, cd) for d in flat[2::4]]
        ud = [cast_factor(u, cd) for u in flat[3::4]]
        rs = [d.shape[0] for d in dd]
        offs = [sum(rs[:i]) for i in range(n)]
        xs = cast_input(x, cd)
        fmerged = max(rs) <= _FWD_MAX_RANK and _fwd_merged_on(xs) and _merged_pays(xs, xs.shape[0], specs[0].in_dim)
        fused = None if fmerged else _fused_members(xs, specs, ws, bs, dd, ud, rs, offs, cd)
        ys, dcat = [], None
        if fmerged:  # every member through its merged weight built ahead (.lowrank._fwd_weights), the downs beside
            wms = _fwd_weights(xs, flat[2], _weak_build(_merged_group, ss, cd, *flat))
            fside = _forward_side(xs)
            with _fork(fside):
                dcat = torch.cat(dd, 0)
                h = F.linear(xs, dcat)
            ys = [F.linear(xs, wms[i], cast(bs[i], cd)) for i in range(n)]
            _join(fside)
            del wms
        elif fused is not None:
            # each member one Triton GEMM (lowrank._fused_gemm) writing its h into its columns of the group's h: x is
            # read by each member's frozen product anyway, and the down rides along in the same k-loop
            h, parts = fused
            for i, (w, b, hs) in enumerate(parts):
                ys.append(fused_linear(xs, w, b, dd[i], ud[i], ss[i], hs)[0])
        else:
            fside = _forward_side(xs)  # the down beside the members' frozen GEMMs where it may (lowrank._forward_side)
            with _fork(fside):
                dcat = torch.cat(dd, 0)
                h = F.linear(xs, dcat)
            if fside is not None:  # every member's frozen GEMM beside the down, then the ups
                ys = [F.linear(xs, cast(ws[i], cd), cast(bs[i], cd)) for i in range(n)]
                _join(fside)
                for i in range(n):
                    ys[i].addmm_(h[:, offs[i]:offs[i] + rs[i]], ud[i].t(), alpha=ss[i])
            else:
                for i in range(n):
                    y = F.linear(xs, cast(ws[i], cd), cast(bs[i], cd))
                    y.addmm_(h[:, offs[i]:offs[i] + rs[i]], ud[i].t(), alpha=ss[i])
                    ys.append(y)
        ctx.set_materialize_grads(False)
        ctx.cfg = (specs, ss, x.shape, x.dtype, rs, offs,
                   tuple((d.shape, d.dtype, u.shape, u.dtype) for d, u in zip(flat[2::4], flat[3::4])))
        ctx.leaves = [_sink_leaves(d, u) for d, u in zip(flat[2::4], flat[3::4])]
        # x regenerated in backward where its producer keeps what it is made of (.regen; a transformer block's
        # norm1 output is q/k/v's x), as the bypass op does: only an input of the op's own dtype (not cast here)
        found = regen.find(x, norm=True) if xs is x else None
        ctx.regen = None if found is None else found[0]
        ctx.save_for_backward(*((xs,) if found is None else found[1]), h, *ws, *dd, *ud)
        ctx.ahead = None
        # ∂x as Σ ∂y_i·W_i + (the group's ∂h)·[D_1; …; D_n] where the rows do not pay for the merged weights
        # (.lowrank._merged_pays, k = the members' outputs summed)
        ctx.split = ctx.needs_input_grad[0] and not _merged_pays(xs, xs.shape[0], sum(sp.out_dim for sp in specs))
        # the stacked downs the forward's h read, for the split ∂x's GEMM: the factors do not change within a step, and
        # the backward's cat ran on its current stream, after the side stream's join (one launch per group and step;
        # a few Σr × in elements kept). Allocated on the forward's side stream and read here only after its join.
        ctx.dcat = dcat if ctx.split else None
        if ctx.needs_input_grad[0] and not ctx.split:  # every member's merged weight, built ahead by the next op's backward
            _ahead_link(ctx, xs, _merged_all, ws, ud, dd, ss, cd)
        return tuple(ys)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gys):
        specs, ss, xshape, xdt, rs, offs, metas = ctx.cfg
        n = len(specs)
        saved = ctx.saved_tensors
        rg = ctx.regen
        if rg is not None:  # x's makings (regen.find) in its place
            kept, saved = saved[:rg.n], (None,) + saved[rg.n:]
        xs, h = saved[0], saved[1]
        ws, dd, ud = saved[2:2 + n], saved[2 + n:2 + 2 * n], saved[2 + 2 * n:2 + 3 * n]
        needs = ctx.needs_input_grad
        need_x = needs[0]
        need_d = [needs[2 + 4 * i + 2] and gys[i] is not None for i in range(n)]
        need_u = [needs[2 + 4 * i + 3] and gys[i] is not None for i in range(n)]
        live = [i for i in range(n) if gys[i] is not None]
        grads: list = [None] * (2 + 4 * n)
        ahead, ctx.ahead = ctx.ahead, None
        pre = _ahead_take(ahead)
        if not live:
            return tuple(grads)
        gy0 = gys[live[0]]
        _fwd_reset(gy0.device)
        late = _late_on(gy0)
        if late:
            _late_wait(gy0.device)
        cd = gy0.dtype
        gd: list = [None] * n
        gu: list = [None] * n
        side = side_stream(gy0) if any(need_d) or any(need_u) else None
        # the ∂U's on a second side stream beside the ∂h → ∂D chain where there is one (lowrank.up_stream)
        su = up_stream(gy0) if side is not None and any(need_u) and any(need_d) else None

        split = ctx.split and need_x
        # the members whose ∂h is computed: those whose ∂D is wanted, and where ∂x takes the group's ∂h (split)
        # every member with an output gradient
        want_h = [need_d[i] or (split and gys[i] is not None) for i in range(n)]
        hs: list = []

        def grad_downs():
            # ∂h_i = s_i·∂y_i·U_i side by side (the other members' columns stay zero), then one ∂D GEMM
            gh = gy0.new_zeros((gy0.shape[0], sum(rs))) if not all(want_h) else gy0.new_empty(
                (gy0.shape[0], sum(rs)))
            for i in range(n):
                if want_h[i]:
                    sl = gh[:, offs[i]:offs[i] + rs[i]]
                    torch.addmm(sl.new_empty(()), gys[i], ud[i], beta=0, alpha=ss[i], out=sl)
            hs.append(gh)
            if not any(need_d):
                return
            ddt = metas[live[0]][1]
            same = all(metas[i][1] == ddt for i in range(n))
            if rg is None:
                g_all = _mm(gh.t(), xs, 1.0, ddt if same else None)
            else:  # read by one kernel from what x is made of where it runs, else x rebuilt here
                ops = _regen_operands(rg, kept, cd, specs[0], 1, gh.shape[1])
                if ops is not None:
                    g_all = regen_triton.weight_grad(gh, ops, 1.0, ddt if same else cd)
                else:
                    g_all = _mm(gh.t(), cast(rg.value(kept), cd).view(gh.shape[0], -1), 1.0, ddt if same else None)
            for i in range(n):
                if need_d[i]:  # into .grad here, on this stream, where the sink takes it (lowrank._sink_add)
                    leaves = ctx.leaves[i]
                    gd[i] = _sink_add(g_all[offs[i]:offs[i] + rs[i]], _sink_grad(leaves[0]) if leaves else None)

        def grad_ups():
            for i in live:
                ushape, udt = metas[i][2:]
                leaves = ctx.leaves[i]
                if need_u[i]:
                    into = _sink_into(leaves[1], tuple(ushape), cd) if leaves is not None else None
                    gu[i] = _mm(gys[i].t(), h[:, offs[i]:offs[i] + rs[i]], ss[i], udt, into)

        _side_products(side, su, grad_ups, grad_downs if any(want_h) else None, ahead)
        if need_x:
            # ∂x = Σ ∂y_i·W_i′ added up by the GEMMs themselves (beta = 1), in x's dtype where the GEMM can write it
            # (autocast: a norm's fp32 output — no bf16 rounding of ∂x, no cast); without such GEMMs each product is
            # cast to x's dtype and added there, as autograd's sum of the members' own ∂x would be
            fp = xdt if _out_dtype_ok(gy0, xdt) and _out_dtype_ok(gy0, xdt, into=True) else None
            gx = None
            for i in live:
                if split:
                    w = cast(ws[i], cd)
                else:
                    w = pre[i] if pre is not None else _merged(ws[i], ud[i], dd[i], ss[i], cd)
                if gx is None:
                    gx = torch.mm(gys[i], w, out_dtype=fp) if fp is not None else cast(gys[i] @ w, xdt)
                elif fp is not None:
                    torch.addmm(gx, gys[i], w, beta=1, out_dtype=fp, out=gx)
                elif gx.dtype == cd:
                    gx.addmm_(gys[i], w)
                else:
                    gx.add_(gys[i] @ w)
        late_d = late and side is not None and not split and all(g is None or g is _SUNK for g in gd)
        if not late_d:
            _join(side)  # the ∂D's are returned (autograd reads them on this stream), or ∂x takes ∂h (split)
        if need_x:
            if split:  # the adapters' part after the side stream's ∂h: one GEMM over the members' downs stacked
                dcat, ctx.dcat = (ctx.dcat if ctx.dcat is not None else torch.cat(dd, 0)), None
                if fp is not None:
                    torch.addmm(gx, hs[0], dcat, beta=1, out_dtype=fp, out=gx)
                elif gx.dtype == cd:
                    gx.addmm_(hs[0], dcat)
                else:
                    gx.add_(hs[0] @ dcat)
            grads[0] = like(gx, xshape, xdt)
        keep = (gys, xs, h, ws, dd, ud, kept if rg is not None else None) if late else None
        if late_d:
            _late_join(side, keep)
        if late and su is not None and all(g is None or g is _SUNK for g in gu):
            _late_join(su, keep)
        else:
            _join(su)
        for i in range(n):
            dshape, ddt, ushape, udt = metas[i]
            if gd[i] is not None and gd[i] is not _SUNK:
                grads[2 + 4 * i + 2] = like(gd[i], dshape, ddt)
            if gu[i] is not None and gu[i] is not _SUNK:
                grads[2 + 4 * i + 3] = like(gu[i], ushape, udt)
        return tuple(grads)


def shared_op(x: torch.Tensor, parts, cd: torch.dtype) -> list[torch.Tensor] | None:
    """Each member's ``x·W_iᵀ + b_i + s_i·U_i·(D_i·x)`` (module doc); ``parts``: per member ``(spec, W, b, D, U, s)``
    with ``D`` ``(r_i, in)``, ``U`` ``(out_i, r_i)``, s a Python number; ``cd`` the compute dtype
    (:func:`.lowrank._compute_dtype`). None where the group is not supported (:func:`supports`)."""
    if not supports(x, parts):
        return None
    specs = tuple(p[0] for p in parts)
    ss = tuple(float(p[5]) for p in parts)
    flat = []
    for _, w, b, d, u, _ in parts:
        flat += [w, b, d, u]
    return list(_SharedOp.apply(x, (specs, ss, cd), *flat))


"""The rebuild path's autograd op: ``y = op(x, W′(θ), b′(θ))`` that keeps ``x`` and the adapter
tensors θ for backward, never the rebuilt weight ``W′``.

Plain autograd through ``layer_op(x, merged(θ))`` keeps ``W′`` (a weight-sized tensor per layer) and
every weight-sized intermediate of the algorithm's ``merged`` (DoRA: ``W + γUD`` and its norm;
BOFT: each butterfly stage) until the backward pass reaches the layer. Here ``W′`` is built under
``no_grad`` in the forward and **rebuilt in backward** from θ (cheap: weight-sized work, where the
layer's GEMM is activation-sized), then

* ``∂x = op_backward_input(∂y, W′)`` — the frozen layer's own input gradient;
* ``∂W′ = op_backward_weight(∂y, x)`` — one weight-gradient GEMM (what full fine-tuning pays);
* ``∂θ`` from ``∂W′``: by the algorithm's own backward where it has one (DoRA over LoRA, (IA)³, GLoRA,
  Full, BOFT, LoKr: a few weight-sized kernels), else by autograd through the rebuilt ``merged(θ)`` — a
  nested backward per layer, correct for every algorithm but costly in host time;
* or ``∂θ`` straight from ``∂y`` and ``x``, no ``∂W′``, where the build offers it for the layer and input
  (``direct_ok`` / ``direct_grads``: LoKr's full W2 on a linear layer, :func:`.lokr.kron_linear_grads`).

What it trades: the bypass ``f(x) + m·Δy`` keeps activation-sized tensors for its ∂θ (DoRA: the base
output for ∂g; (IA)³: ``f(x) − b``; BOFT: every stage's activations; LoKr/LoHa dense: a second
full-size GEMM forward and two backward) — this keeps only ``x``, which is shared by the layers
reading the same input (q/k/v) and often kept by its producer anyway, and it costs one
weight-gradient GEMM. Which algorithm takes it under ``mode = "auto"`` is decided in the algorithm
file (``prefers_rebuild_for``) from measurements (benchmarks/NOTES.md).

Numerics: ``W′`` is rounded once to the model's dtype (bf16: 2⁻⁹ relative per element), as the
bypass's output ``f(x) + m·Δy`` is rounded once per element; deltas far below that vanish from the
forward in both. The gradients of θ are exact functions of ``∂y`` and ``x`` (no rounding of ΔW into
W enters them). Under ``torch.compile`` the op is not used (compile keeps or recomputes what it
chooses); with autograd disabled it is a plain ``op(x, W′, b′)``.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import graph_policy
from .base import CONV_KINDS, LINEAR, LayerSpec, layer_op

#: builds (W′, b′) from (W, b, *θ); differentiable in every tensor it receives. It may also carry
#: its own backward, used when the base weight and bias are frozen (no autograd in either pass):
#: ``forward_aux(W, b, *θ)`` → ``(W′, b′, keep)`` with ``keep`` a tuple of small tensors saved for
#: backward (norms, gains); ``recompute(keep, W, b, *θ)`` → ``(W′, aux)`` in backward; and
#: ``vjp(aux, θ, ∂W′, ∂b′, needs)`` → the gradients of θ (None where ``needs`` is False); ``∂b′`` is
#: computed only for a build whose ``bias_grad`` attribute is true (else None). Without them, ∂θ
#: comes from autograd through the rebuilt ``build``.
Build = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def like(t: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """``t`` reshaped to ``shape`` and cast to ``dtype``, skipping the calls that would do nothing: on
    a launch-bound host every no-op ``reshape``/``to`` costs a few µs per layer per step."""
    if t.shape != shape:
        t = t.reshape(shape)
    return t if t.dtype == dtype else t.to(dtype)


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_i a[j, i]·b[j, i]`` per row of two 2-D tensors, as one batched GEMM (accumulated in fp32
    by the GEMM for bf16/fp16, no weight-sized product written), in the inputs' dtype."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(a.shape[0])


def supports(spec: LayerSpec) -> bool:
    """Layers whose input and weight gradients this module computes itself: linear, and convs with
    zero padding given as integers (``padding="same"`` strings and other padding modes fall back)."""
    if spec.kind == LINEAR:
        return True
    if spec.kind in CONV_KINDS:
        return spec.padding_mode == "zeros" and not isinstance(spec.padding, str)
    return False


CONV_BWD = torch.ops.aten.convolution_backward.default  # the overload itself: no packet lookup per call


def op_backward(spec: LayerSpec, x: torch.Tensor, w: torch.Tensor, gy: torch.Tensor,
                 need_x: bool, need_w: bool, need_b: bool):
    """(∂x, ∂W, ∂b) of ``op(x, w, b)`` for the output gradient ``gy`` (computed in ``gy``'s dtype)."""
    xd = cast(x, gy.dtype)
    if spec.kind == LINEAR:
        g2 = gy if gy.dim() == 2 else gy.reshape(-1, gy.shape[-1])
        gx = gw = gb = None
        if need_x:
            gx = g2 @ w
            if x.dim() != 2:
                gx = gx.reshape(x.shape)
        if need_w:
            gw = g2.t() @ (xd if xd.dim() == 2 else xd.reshape(-1, xd.shape[-1]))
        if need_b:
            gb = g2.sum(0)
        return gx, gw, gb
    n = len(spec.kernel)
    gx, gw, gb = CONV_BWD(
        gy, xd, w, [w.shape[0]] if need_b else None, list(spec.stride), list(spec.pads), list(spec.dilation),
        False, [0] * n, spec.groups, [need_x, need_w, need_b])
    return gx, gw, gb


class _RebuiltOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec, build, weight, bias, *theta):
        # Function.forward runs without autograd
        own = getattr(build, "vjp", None) is not None and not weight.requires_grad and not (
            bias is not None and bias.requires_grad)
        if own:
            w2, b2, keep = build.forward_aux(weight, bias, *theta)
        else:
            (w2, b2), keep = build(weight, bias, *theta), ()
        wx = cast(w2, x.dtype)
        y = layer_op(x, spec, wx, cast(b2, x.dtype))
        ctx.spec, ctx.build, ctx.own, ctx.n_theta = spec, build, own, len(theta)
        # W′ itself kept for the backward instead of rebuilt there (change 185, off by default: _keep_w)
        ctx.kept = own and _keep_w(build, weight)
        ctx.save_for_backward(x, weight, bias, *theta, *keep, *((wx,) if ctx.kept else ()))
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, *rest = ctx.saved_tensors
        kept = rest.pop() if ctx.kept else None
        theta, keep = rest[:ctx.n_theta], rest[ctx.n_theta:]
        need = ctx.needs_input_grad  # (x, spec, build, weight, bias, *theta)
        build = ctx.build
        if ctx.own:
            # the algorithm's own backward through its build (no nested autograd: a few kernels and
            # no engine re-entry per layer — on a launch-bound host that is most of the cost)
            want = any(need[5:])
            # a build may have its parameters' gradients from elsewhere for this ∂y (``take_grads``, else None):
            # output-mode (IA)³ from the GEGLU kernel of the layer reading its output (.ia3, change 121) — no ∂W′
            take = getattr(build, "take_grads", None) if want else None
            grads = take(gy, theta, need[5:]) if take is not None else None
            # or straight from ∂y and x, never ∂W′ (``direct_ok`` / ``direct_grads``): LoKr's full W2 on a linear
            # layer of few rows for its weight (.lokr._KronBuild.direct_ok)
            direct = want and grads is None and _direct(build, ctx.spec, x)
            need_w = want and grads is None and not direct
            need_b = need_w and getattr(build, "bias_grad", False)
            side = _side(gy) if need[0] and (need_w or direct) and _side_wanted(build) else None
            # the side region before the rebuild of W′ where it reads neither W′ nor what the rebuild returns
            # (change 175): the rebuild then runs beside it instead of before both. Not for a channels-last frozen
            # conv weight: standing in for W′ (contiguous, as the merge writes it) it would give ∂W′ its layout
            early = (side is not None and (direct or not getattr(build, "vjp_reads_aux", True))
                     and weight.is_contiguous() and _early_fork())
            w2c = aux = None
            if kept is not None:  # the forward's W′ (a build that keeps it reads no aux: _keep_w)
                w2c = cast(kept, gy.dtype)
            elif not early:
                w2, aux = build.recompute(keep, weight, bias, *theta)
                w2c = cast(w2, gy.dtype)
            if side is not None:
                # ∂W′ and the build's backward from it (or the direct form) on the side stream beside ∂x
                # (lowrank.side_stream's discipline: forked after everything issued so far, joined before the
                # gradients are returned)
                from .lowrank import _fork, _join
                with _fork(side, _side_sms()):
                    if direct:
                        grads = build.direct_grads(x, gy, theta, need[5:])
                    else:  # ∂W′ reads W′'s shape only: the frozen W stands in before the rebuild
                        shape_w = cast(weight, gy.dtype) if early else w2c
                        gw, gb = op_backward(ctx.spec, x, shape_w, gy, False, True, need_b)[1:]
                        grads = build.vjp(aux, theta, gw, gb, need[5:])
                        del gw, gb
                if early and kept is None:
                    w2c = cast(build.recompute(keep, weight, bias, *theta)[0], gy.dtype)
                gx = op_backward(ctx.spec, x, w2c, gy, True, False, False)[0]
                _join(side)
                return (cast(gx, x.dtype), None, None, None, None, *grads)
            gx, gw, gb = op_backward(ctx.spec, x, w2c, gy, need[0], need_w, need_b)
            if direct:
                grads = build.direct_grads(x, gy, theta, need[5:])
            elif grads is None:
                grads = build.vjp(aux, theta, gw, gb, need[5:]) if want else (None,) * len(theta)
            return (cast(gx, x.dtype), None, None, None, None, *grads)
        need_in = (need[3], need[4], *need[5:])
        ins = [weight, bias, *theta]
        leaves = [t.detach().requires_grad_() if (n and t is not None) else t for t, n in zip(ins, need_in)]
        want = [leaf for leaf, n in zip(leaves, need_in) if n and leaf is not None]
        w2 = b2 = None
        if want:
            with torch.enable_grad():
                w2, b2 = ctx.build(*leaves)
        else:
            w2, b2 = ctx.build(*ins)
        need_w = w2.requires_grad
        need_b = b2 is not None and b2.requires_grad
        gx, gw, gb = op_backward(ctx.spec, x, cast(w2.detach(), gy.dtype), gy, need[0], need_w, need_b)
        grads_in = [None] * len(ins)
        if want:
            outs, gouts = ([w2], [like(gw, w2.shape, w2.dtype)]) if need_w else ([], [])
            if need_b:
                outs.append(b2)
                gouts.append(cast(gb, b2.dtype))
            got = iter(torch.autograd.grad(outs, want, gouts, allow_unused=True)) if outs else iter(())
            for i, (leaf, n) in enumerate(zip(leaves, need_in)):
                if n and leaf is not None:
                    grads_in[i] = next(got, None)
        return (cast(gx, x.dtype), None, None, *grads_in)


def _side(gy: torch.Tensor):
    """The side stream (:func:`.lowrank.side_stream`) for a rebuilt op's own backward where ``LYCO_REBUILD_STREAMS``
    (:mod:`.graph_policy`, captured steps by default), else None: its weight gradient ``∂W′`` and the build's backward
    from it (:meth:`vjp`) run there while the current stream computes ∂x — as the bypass op's products beside its
    ∂x. Run 249's SD1.5 b1 LoKr timeline (H100, the rebuilt op on 111 layers): ``_kron_wgrad_kernel``'s 111 launches
    0.87 ms exposed of 0.87 summed — nothing ran beside them. Only for a build that asks for it (:func:`_side_wanted`)."""
    from .lowrank import side_stream
    if not graph_policy.wanted("LYCO_REBUILD_STREAMS"):
        return None
    return side_stream(gy)


def _side_sms() -> bool:
    """Whether the side region of a rebuilt op's backward (:func:`_side`) takes the side streams' SM target in a
    capture (:func:`.blas_sms.side`, ``LYCO_SIDE_SMS``: 32 of the device's SMs by default) — ``LYCO_REBUILD_SIDE_SMS``
    (:mod:`.graph_policy`; ``0``, the default since change 176: no, cuBLAS's own choice there; ``graph``: yes, as
    from change 168 to 175).

    Why the switch: change 168 chose the side streams' GEMMs for 32 SMs for the bypass op's thin products (rank-wide
    outputs), and this region went with it unmeasured — but its GEMM is ∂W′, as large as the frozen layer's own. Run
    328's SDXL b1 ``lokr-full`` timeline has the ∂W′ GEMMs (by inference from their counts: the trace has no shapes)
    in ``448x64`` tiles, 60 CTAs for a 1280 × 1280 output, at 29 µs a call — ≈ 116 TFLOP/s if they are the 1024-row
    products; and LoKr full-matrix's SDXL ratios rose from the H100's 1.623 / 1.377 (b1 / b4, runs 219–221: before
    change 168 and many others) to 1.784 / 1.681 (run 327).

    Measured (H200, runs 329–330, captured steps): without the target LoKr full-matrix's SDXL b1 step went
    103.81 → 87.38 ms, SDXL b4 278.35 → 219.60, SD1.5 b1 24.98 → 24.23, SD1.5 b8 80.04 → 74.51, and LoKr f8's
    SD1.5 b8 73.66 → 72.23 — hence off by default."""
    return graph_policy.wanted("LYCO_REBUILD_SIDE_SMS", "0")


def _early_fork() -> bool:
    """Whether a rebuilt op's side region is forked before its rebuild of W′ where the region reads neither
    (``LYCO_REBUILD_EARLY_FORK``, :mod:`.graph_policy`; ``graph`` by default since change 176): the direct form, or a
    build whose ``vjp`` does not read the rebuild's ``aux`` (its ``vjp_reads_aux`` False: LoKr's).

    Why: forked after the rebuild, the side region (∂W′ and its reductions) waits for it, and ∂x waits for it too —
    the rebuild sits before both on the critical path. Run 328's SDXL b1 ``lokr-full`` timeline has the merges
    (``_kron_merge_kernel``, 1495 launches, forward's and backward's) at 7.28 of their 7.45 ms exposed; the
    backward's half of them could run beside the side region instead.

    Measured (H200, run 329, SDXL b1 ``lokr-full``, captured, both without change 174's SM target): 87.38 ms
    without the early fork, 84.87 with it.

    Not kept (NOTES changes 178–179, run 333, H200, SDXL b1 ``lokr-full`` 83.03 / 82.99 ms without): W′ built a layer
    ahead on the up stream, the forward's (82.78, a tie) and ∂x's in the backward (86.65, a loss) — taken out."""
    return graph_policy.wanted("LYCO_REBUILD_EARLY_FORK")


#: the most elements of a W′ the rebuilt op keeps from its forward for its backward (:func:`_keep_w`;
#: ``LYCO_REBUILD_KEEP_W``, 0 by default: none)
_KEEP_W = graph_policy.env_int("LYCO_REBUILD_KEEP_W", 0, "the most elements of a W′ the rebuilt op keeps")


def _keep_w(build, weight: torch.Tensor) -> bool:
    """Whether a rebuilt op keeps the W′ its forward built for its own backward instead of rebuilding it there (change
    185, prepared in session 49, **not measured**): W of at most ``LYCO_REBUILD_KEEP_W`` elements (0, the default:
    never), a build whose backward reads nothing of the rebuild but W′ (``vjp_reads_aux`` False: LoKr's).

    Why: the backward's rebuild is one merge per layer (LoKr: ``factor_triton.kron_merge``); run 340's SDXL b1
    lokr-full timeline had the 1495 merges (forward's and backward's) at 9.14 ms exposed, run 341 one merge of every
    linear layer at 3.44 ms alone — the 372 layers of 1280 × 1280 at 3.3 µs each, short launches at 2.0 TB/s. What it
    costs: each kept W′ stays until its layer's backward, so the peak gains their sum — by the layer sizes (arithmetic,
    bf16), SDXL's linear W′ of at most 1280 × 1280 elements sum to ≈ 1.36 GB (372 × 3.3 MB, 70 × 0.8, 20 × 2.6,
    10 × 3.3; the convs not counted), which must stay under the best peer's peak. Elsewhere the op keeps the module's
    trade (x kept, W′ rebuilt)."""
    return 0 < weight.numel() <= _KEEP_W and not getattr(build, "vjp_reads_aux", True)


def _direct(build, spec: LayerSpec, x: torch.Tensor) -> bool:
    """Whether a build forms its parameters' gradients from ∂y and x itself here (its ``direct_ok``; False for a
    build without one)."""
    ok = getattr(build, "direct_ok", None)
    return ok is not None and ok(spec, x)


def _side_wanted(build) -> bool:
    """Whether a build's own backward takes the side stream (:func:`_side`): its ``side_backward`` attribute, False
    where it has none. On where measured to gain — LoKr's (:class:`.lokr._KronBuild`). H100, one graph per step, on /
    off (benchmarks/NOTES.md change 144): LoKr SD1.5 b1 **28.74 / 29.12 / 28.69 ms** (run 251), SD1.5 b8 79.81 / 80.60,
    SDXL b1 87.91 / 88.44 (run 252), graph peaks unchanged. Off where it did not: Full SD1.5 b1 25.38 / 25.74 but b8
    78.45 / 77.86 (runs 251, 253; run 252's off 77.68) — presumably (not profiled) its ∂W′, a weight-sized GEMM over
    all the rows, then shares the device with the ∂x GEMM; DoRA SD1.5 b1 28.50 / 28.40, graph peak 2.592 / 2.561 GiB (run 251). (IA)³'s,
    GLoRA's, OFT's and BOFT's: not measured (tests/test_fast_paths.py runs every own backward through it)."""
    return bool(getattr(build, "side_backward", False))


def rebuilt_op(x: torch.Tensor, spec: LayerSpec, weight: torch.Tensor, bias: torch.Tensor | None,
               build: Build, *theta: torch.Tensor) -> torch.Tensor | None:
    """``op(x, *build(weight, bias, *theta))`` keeping only ``x`` (and the inputs) for backward, or
    None when the layer kind is not supported (the caller takes another path)."""
    if not supports(spec):
        return None
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        w2, b2 = build(weight, bias, *theta)
        return layer_op(x, spec, cast(w2, x.dtype), cast(b2, x.dtype))
    if spec.kind == LINEAR and x.dim() > 2:
        # on rows, reshaped after: F.linear on a 3-D x inside the Function returns a view of a tensor autograd never
        # sees, and a GEGLU reading this output could not be found from its halves' base (.regen.find_geglu;
        # run 204: (IA)³'s 64×64-level GEGLU projections, which take this op, left 5 of SD1.5's 16 GEGLUs unfused)
        y = _RebuiltOp.apply(x.reshape(-1, x.shape[-1]), spec, build, weight, bias, *theta)
        return y.view(*x.shape[:-1], y.shape[-1])
    return _RebuiltOp.apply(x, spec, build, weight, bias, *theta)


def merged_build(algorithm, t: dict, spec: LayerSpec, multiplier: float, merged=None,
                 to_weight_dtype: bool = True) -> tuple[Build, list[str]]:
    """A :data:`Build` over ``merged(t, spec, W, b, multiplier)`` (default: the algorithm's own
    ``merged``), and the names of the tensor entries of ``t`` it takes as θ (in order). Adapter tensors
    are cast to the weight's dtype first (as :meth:`lyco.layer.AdapterLayer.merged_weight` does) unless
    ``to_weight_dtype`` is False (DoRA: its magnitude must not be rounded to bf16); frozen scalars stay
    Python numbers."""
    keys = [k for k, v in t.items() if isinstance(v, torch.Tensor)]
    fixed = {k: v for k, v in t.items() if not isinstance(v, torch.Tensor)}
    merged = algorithm.merged if merged is None else merged

    def build(weight, bias, *theta):
        tt = dict(fixed)
        for k, v in zip(keys, theta):
            tt[k] = cast(v, weight.dtype) if (to_weight_dtype and v.is_floating_point()) else v
        return merged(tt, spec, weight, bias, multiplier)

    return build, keys

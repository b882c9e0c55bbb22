"""(IA)³: learned per-channel rescaling of a layer's weight, on its output or its input axis.

File tensors (LyCORIS):
  ``weight``    ``(C,)`` for linear, ``(1, C, 1, …)`` for conv (both shapes are accepted on read);
                C = out features, or in channels when ``on_input``;
  ``on_input``  0-d int64 flag (detection key; files saved in fp16 carry it as a float 0./1.).
No alpha. ``create`` starts from zeros, i.e. the identity scaling.

Semantics (LyCORIS merge, A1111 ``network_ia3``): ``W' = W ⊙ (1 + m·w)`` broadcast along the
output axis (rows), or along the input axis (columns) when ``on_input``; the **bias is never
scaled**. So ``ΔW = W ⊙ w`` depends on the base weight, and ``W + m·ΔW`` is linear in m.

Deliberate differences from LyCORIS:
  * LyCORIS's *bypass* forward computes ``f(x)·(1 + m·w)`` in output mode, which scales the bias
    too, so its bypass and its merge disagree on any layer with a bias. We follow the merge
    (what the loaders compute) in both of our paths: ``Δy = w ⊙ (f(x) − b)``.
  * LyCORIS cannot reload its own IA3 files (``make_module_from_state_dict`` receives
    ``on_input`` as an extra argument and raises TypeError); we read ``on_input`` properly.
  * A grouped conv in input mode: ``w`` has one entry per *input channel* (``in_channels``, as
    LyCORIS sizes it); each output row reads the columns of its own group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import (
    CONV1D, CONV2D, CONV3D, LINEAR, Algorithm, Tensors, channel_view, input_channel_view, layer_op,
    register,
)
from . import graph_policy, regen, scale_triton
from .lowrank import _compute_dtype
from .rebuild import cast, like, rebuilt_op, rowdot, supports as rebuild_supports


def ia3_on_input(t) -> bool:
    flag = t.get("on_input")
    if flag is None:
        return False
    if isinstance(flag, (int, float)):  # the forward path passes it as a number (no device sync)
        return float(flag) != 0.0
    return float(flag.reshape(-1)[0]) != 0.0


def ia3_row_col_scale(w: torch.Tensor, spec, on_input: bool) -> torch.Tensor:
    """The per-entry factor of ΔW = W ⊙ factor, broadcastable against the weight."""
    w = w.reshape(-1)
    nd = len(spec.weight_shape)
    if not on_input:
        return w.reshape((spec.out_dim,) + (1,) * (nd - 1))
    if spec.is_conv and spec.groups != 1:
        # column j of a row in group g multiplies input channel g·(in/groups) + j
        per_row = w.reshape(spec.groups, spec.in_dim).repeat_interleave(spec.out_dim // spec.groups, dim=0)
        return per_row.reshape((spec.out_dim, spec.in_dim) + (1,) * (nd - 2))
    return w.reshape((1, spec.in_dim) + (1,) * (nd - 2))


class _OutputScaleBuild:
    """(IA)³ output mode for :mod:`.rebuild`: ``W′ = W + s·(W ⊙ w)`` rows (one ``addcmul``, the weight
    rounded once; ``s·w`` is small and exact to its own precision — never ``1 + s·w`` in bf16), the
    bias unscaled; one Triton launch on CUDA where no autograd records it (:func:`.scale_triton.scale_rows`).
    Backward by hand: ``∂w_j = s·⟨E_j, W_j⟩`` (E = ∂L/∂W′), one batched dot."""

    def __init__(self, s: float, link=None):
        self.s = s
        self.link = link  # a scale_triton.ChannelLink on the op's output (change 121), or None

    def take_grads(self, gy, theta, needs):
        """``(∂w,)`` from the column sums a GEGLU consumer's kernel offered for exactly ``gy`` (:class:`.scale_triton.
        ChannelLink`: ``∂w = s·Σ ∂y·(y − b)/d``, the same value as ``s·⟨∂W′_j, W_j⟩`` in exact arithmetic), else None
        — the rebuilt op then forms ∂W′ from the kept x."""
        part = self.link.take(gy) if self.link is not None else None
        if part is None:
            return None
        wv = theta[0]
        fn = scale_triton.channel_finish if part.is_cuda else scale_triton.channel_finish_torch
        return (fn(part, wv, self.s),)

    def __call__(self, w, b, wv):
        if w.is_cuda and scale_triton.rows_usable(w, wv):
            return scale_triton.scale_rows(w, wv, self.s), b
        return scale_triton.scale_rows_torch(w, wv, self.s), b

    def forward_aux(self, w, b, wv):
        w2, b2 = self(w, b, wv)
        return w2, b2, ((w2,) if _keep_weight(w2) else ())

    def recompute(self, keep, w, b, wv):
        return (keep[0] if keep else self(w, b, wv)[0]), w

    def vjp(self, w, theta, gw, gb, needs):
        wv = theta[0]
        w2 = w if w.dim() == 2 else w.reshape(w.shape[0], -1)
        g = rowdot(like(gw, w2.shape, w2.dtype), w2)
        if self.s != 1.0:
            g = g * self.s
        return (like(g, wv.shape, wv.dtype),)


#: the narrowest input (``in_features``) on which :func:`_keep_output` takes a linear layer: the weight-gradient GEMM it
#: saves costs ≈ 2·in multiply-adds per output element, the two passes over ∂y and y it adds ≈ 4 bytes (≈ 430 inputs
#: break even at an H100's ≈ 600 TFLOP/s and ≈ 2.8 TB/s); ``LYCO_IA3_KEEP_OUTPUT_MIN_IN`` overrides it (A/B runs)
KEEP_OUTPUT_MIN_IN = 512


#: the largest weight (elements) whose W′ an output-mode op keeps from its forward for the backward's ∂x instead of
#: building it again: the small builds are launch-bound (≈ 2 µs each on an H100, run 207's trace) where their bytes
#: are few; ``LYCO_IA3_KEEP_WEIGHT_MAX`` overrides it (0: none; A/B runs)
KEEP_WEIGHT_MAX = 0


def _keep_weight(w2: torch.Tensor) -> bool:
    """Whether an output-mode op keeps its built W′ for backward (:data:`KEEP_WEIGHT_MAX`)."""
    return w2.numel() <= graph_policy.env_int("LYCO_IA3_KEEP_WEIGHT_MAX", KEEP_WEIGHT_MAX, "weight elements")


def _min_in() -> int:
    """:data:`KEEP_OUTPUT_MIN_IN`, or ``LYCO_IA3_KEEP_OUTPUT_MIN_IN`` where set (an error naming it if not an integer)."""
    return graph_policy.env_int("LYCO_IA3_KEEP_OUTPUT_MIN_IN", KEEP_OUTPUT_MIN_IN, "input features")


def _scale_output(rows: int, in_dim: int, forward: bool) -> bool:
    """Whether :class:`_KeepOutput` scales the **output** instead of building ``W′ = W ⊙ (1 + s·w)`` rows (change
    129; ``LYCO_IA3_SCALE_OUTPUT``, :mod:`.graph_policy`, captured steps by default): forward, the frozen GEMM
    without its bias, then ``y = z ⊙ (1 + s·w) + b`` in one pass (:func:`.scale_triton.scale_cols`) — an output-sized
    read and write (rows·out elements each) where the build reads and writes the weight (out·in): where rows < in;
    backward, ``∂x = (∂y ⊙ (1 + s·w))·W`` with the scaled ∂y written by the channel-gradient pass that reads ∂y
    anyway — one output-sized write where the build reads and writes the weight: where rows < 2·in. Same launches
    either way. At SDXL b1 (1024 rows at the 1280-wide level: ``ff.net.2``'s 5120 inputs, the attention projections'
    1280) it takes most of the weight traffic off; from SD1.5 b8 up only a few layers."""
    if not graph_policy.wanted("LYCO_IA3_SCALE_OUTPUT"):
        return False
    return rows < (1 if forward else 2) * in_dim


def _pointwise(spec) -> bool:
    """A 2-D conv that is a per-pixel linear map: 1×1, stride 1, no padding or dilation, one group (a transformer's
    ``proj_in``/``proj_out`` in SD 1.x/2.x)."""
    return (spec.kind == CONV2D and spec.kernel == (1, 1) and spec.groups == 1 and spec.padding_mode == "zeros"
            and not isinstance(spec.padding, str) and all(p == 0 for p in spec.pads)
            and all(v == 1 for v in spec.stride) and all(v == 1 for v in spec.dilation))


def _keep_output(x: torch.Tensor, spec, weight, bias) -> bool:
    """Whether an output-mode layer takes :class:`_KeepOutput`: ``LYCO_IA3_KEEP_OUTPUT`` (:mod:`.graph_policy`,
    captured steps by default — two Triton launches per layer), a linear layer with at least
    :data:`KEEP_OUTPUT_MIN_IN` inputs or a pointwise conv (:func:`_pointwise`; ``LYCO_IA3_KEEP_OUTPUT_CONV`` too,
    :class:`_KeepOutputConv`, change 123), its weight and bias frozen, gradients on, not under ``torch.compile``, and
    on CUDA the kernels of :mod:`.scale_triton` usable (the CPU takes its torch form)."""
    # the switch first: an eager step (the default policy) leaves after one environment lookup
    if not graph_policy.wanted("LYCO_IA3_KEEP_OUTPUT"):
        return False
    linear = spec.kind == LINEAR
    if not linear and not (_pointwise(spec) and graph_policy.wanted("LYCO_IA3_KEEP_OUTPUT_CONV")):
        return False
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return False
    if linear and spec.in_dim < _min_in():
        return False
    if x.is_cuda:
        # the output's dtype decides (the kernels read ∂y and y): under autocast a norm's fp32 output (q/k/v, a GEGLU
        # projection) gives a bf16 GEMM — what the trainer runs; the benchmark's bf16 model gives it without autocast
        return scale_triton.usable(x, _compute_dtype(x))
    return True


def _link(spec, bias):
    """A :class:`.scale_triton.ChannelLink` for an output-mode layer whose output may be a GEGLU's projection output
    (an even width; ``LYCO_IA3_GEGLU_SUMS``, :mod:`.graph_policy`, captured steps by default as the GEGLU kernel
    itself): the consumer's kernel hands it the column sums of ∂w (change 121), or None."""
    if spec.out_dim % 2 or not graph_policy.wanted("LYCO_IA3_GEGLU_SUMS"):
        return None
    return scale_triton.ChannelLink(bias)


def _build_in_grad(need_x: bool, kept, y: torch.Tensor, weight: torch.Tensor, wv: torch.Tensor):
    """The weight whose W′ the channel gradient's last launch builds too (change 122: ∂x needs it, it was not kept,
    on CUDA where the row kernel runs), or None — for the output-keeping ops' backward."""
    if need_x and kept is None and y.is_cuda and scale_triton.rows_usable(weight, wv):
        return weight
    return None


class _KeepOutput(torch.autograd.Function):
    """Output-mode (IA)³ on a linear layer, ``y = x·W′ᵀ + b`` with ``W′ = W + s·(W ⊙ w)`` rows (as the rebuilt op),
    keeping the **output** ``y`` for backward instead of ``x``; backward rebuilds W′ for ``∂x = ∂y·W′`` and takes
    ``∂w = s·Σ_n ∂y ⊙ (x·Wᵀ) = s·Σ_n ∂y ⊙ (y − b) / (1 + s·w)`` per channel from ∂y and y (two reads,
    :mod:`.scale_triton`) — where the rebuilt op runs a weight-gradient GEMM ``∂W′ = ∂yᵀ·x`` (the layer's forward
    multiply-adds again) and a row dot with W.

    Memory: the output is usually kept by what reads it (attention keeps q/k/v, GEGLU its input), the input often
    is not (nothing else keeps the input of a feed-forward output layer), so keeping y instead of x costs little or
    saves — as Diag-OFT's output-keeping op (:mod:`.oft`).

    Numerics (decision): ``x·Wᵀ = (y − b)/d`` is exact in exact arithmetic for ``d = 1 + s·w ≠ 0``. With y rounded to
    the dtype, the recovered value carries y's rounding divided by ``|d|``; on a layer without a bias that is y's own
    relative rounding, on one with a bias up to ``2⁻⁹·|b|/|d|``. So ``|d|`` is held at ``2⁻⁶`` or more
    (:data:`.scale_triton.MIN_SCALE`, sign kept): a channel whose scale has come within 1/64 of zero — switched off —
    gets its gradient scaled down by ``|d|·2⁶`` (the exact one is a finite value the output no longer carries), where
    the rebuilt op's is exact. Taken only where :func:`_keep_output` holds; the rebuilt op stays everywhere else.

    Measured (H100, bf16, as CUDA graphs; issue 7 runs 162–163, benchmarks/NOTES.md change 108): SD1.5 b8 75.40 →
    **73.41 ms**, peak 8.66 → 8.12 GiB; SDXL b4 1024 px 231.6–232.3 (run 162, the kernels off) → **202.2 ms**, peak
    30.30 → 26.94 GiB — where PEFT's (IA)³ takes 85.0 and 234.6 ms. The float64 gradient check of the benchmark
    (every layer shape, the kernels in eager steps too) 3.9e-3 against the rebuilt op's 3.5e-3 (SDXL 4.1e-3 / 3.3e-3):
    the recovered x·Wᵀ carries y's bf16 rounding. On ``ff.net.2`` after a GEGLU (change 120b, ``LYCO_GEGLU_FUSE``) the
    op takes the projection's output and turns ∂x into its gradient in one pass (:func:`.regen.geglu_input`): runs
    202 and 205, SD1.5 b8 73.50 → 70.94 ms, 8.09 → 7.44 GiB; SDXL b4 201.88 → 190.20 ms, 26.92 → 23.79 GiB."""

    @staticmethod
    def forward(ctx, x, weight, bias, wv, s, xin=None, feed=None, link=None):
        # xin given: x is the GEGLU projection's output p the layer's input xin is made of (.regen.geglu_input,
        # change 120) — the backward turns ∂x into ∂p itself, as the bypass op does for a low-rank adapter; feed: that
        # projection's ChannelLink where it is an op of this kind (change 121), link: this op's own
        p = None
        if xin is not None:
            p, x = x, xin
        cd = _compute_dtype(x)  # autocast's for an fp32 x: its own casts, W′ never made fp32 first
        rows = x.numel() // x.shape[-1]
        # the output scaled instead of the weight where it is the smaller (_scale_output: change 129)
        if _scale_output(rows, weight.shape[1], forward=True):
            z = F.linear(cast(x, cd), cast(weight, cd))
            b = cast(bias, cd)
            y = (scale_triton.scale_cols(z, wv, s, b) if z.is_cuda and scale_triton.cols_usable(z)
                 else scale_triton.scale_cols_torch(z, wv, s, b))
            w2 = None
        else:
            w2, _ = _OutputScaleBuild(s)(weight, None, wv)
            y = F.linear(cast(x, cd), cast(w2, cd), cast(bias, cd))
        ctx.s, ctx.x_dtype, ctx.geglu, ctx.feed, ctx.link = s, x.dtype, p is not None, feed, link
        ctx.kept_w = w2 is not None and _keep_weight(w2)
        ctx.cols = _scale_output(rows, weight.shape[1], forward=False)
        ctx.save_for_backward(y, weight, bias, wv, *(() if p is None else (p,)), *((w2,) if ctx.kept_w else ()))
        return y

    @staticmethod
    def backward(ctx, gy):
        y, weight, bias, wv, *p = ctx.saved_tensors
        kept = p.pop() if ctx.kept_w else None
        s = ctx.s
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = gw = gs = None
        w2 = kept
        if ctx.needs_input_grad[3]:
            # the column sums a GEGLU consumer's kernel formed for exactly this gradient (scale_triton.ChannelLink),
            # else ∂y and y read here — on the current stream: run 207 put that on the side stream beside the ∂x
            # GEMM (lowrank.side_stream) and lost 0.5 ms at SD1.5 b8 (70.18 against 69.67 ms; not hidden). Where ∂x
            # needs W′ built again, the kernel's last launch builds it too (change 122) — or, where ∂y is the smaller
            # (ctx.cols, change 129), that pass writes ∂y ⊙ (1 + s·w) as it reads ∂y and ∂x takes the frozen W
            build = _build_in_grad(ctx.needs_input_grad[0], w2, y, weight, wv)
            part = ctx.link.take(gy) if ctx.link is not None else None
            if part is not None:
                if y.is_cuda:
                    gw = scale_triton.channel_finish(part, wv, s, build)
                else:
                    gw = scale_triton.channel_finish_torch(part, wv, s)
            else:
                if g2.stride(-1) != 1:
                    g2 = g2.contiguous()
                yb = (g2, y.reshape(-1, y.shape[-1]), cast(bias, y.dtype), wv, s)
                if ctx.cols and ctx.needs_input_grad[0] and w2 is None:
                    build = None
                    if y.is_cuda:
                        gw, gs = scale_triton.channel_grad(*yb, scaled=True)
                    else:
                        gw = scale_triton.channel_grad_torch(*yb)
                        gs = (g2 * scale_triton.col_scale_torch(wv, s, g2.dtype)).to(g2.dtype)
                else:
                    gw = scale_triton.channel_grad(*yb, build) if y.is_cuda else scale_triton.channel_grad_torch(*yb)
            if build is not None:
                gw, w2 = gw
        if ctx.needs_input_grad[0]:
            if gs is not None:
                gx = gs @ cast(weight, gy.dtype)
            else:
                if w2 is None:
                    w2 = _OutputScaleBuild(s)(weight, None, wv)[0]
                gx = g2 @ cast(w2, gy.dtype)
            if ctx.geglu:
                from .regen_triton import geglu_input_grad
                gx = geglu_input_grad(cast(gx, ctx.x_dtype), p[0], chan=ctx.feed)
            else:
                gx = cast(gx.reshape(*gy.shape[:-1], gx.shape[-1]), ctx.x_dtype)
        return gx, None, None, gw, None, None, None, None


class _KeepOutputConv(torch.autograd.Function):
    """:class:`_KeepOutput` for a pointwise conv (:func:`_pointwise`; change 123): ``y = conv(x, W′) + b`` keeping y,
    ``∂w`` from ∂y and y over batch and positions (:func:`.scale_triton.channel_grad_bcl`: either may be channels-last
    — the conv before a transformer's reshape gets its gradient back that way), ``∂x = W′ᵀ·∂y`` per position as one
    batched GEMM. Where the rebuilt op ran cuDNN's weight gradient ``∂W′`` (a GEMM over every position, its
    reduction) and a row dot with W. x and y are the same size; run 211 (H100, SD1.5 b8) measured the step 68.22 →
    67.46–67.49 ms and its peak 7.437 → 7.265 GiB (the kept y is shared where the kept x was not; not traced further).
    Numerics as :class:`_KeepOutput`'s (the recovered ``x·Wᵀ`` carries y's rounding; ``|d| ≥ 2⁻⁶``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, wv, s):
        w2, _ = _OutputScaleBuild(s)(weight, None, wv)
        y = F.conv2d(x, cast(w2, x.dtype), cast(bias, x.dtype))
        ctx.s, ctx.x_dtype, ctx.kept_w = s, x.dtype, _keep_weight(w2)
        ctx.save_for_backward(y, weight, bias, wv, *((w2,) if ctx.kept_w else ()))
        return y

    @staticmethod
    def backward(ctx, gy):
        y, weight, bias, wv, *kept = ctx.saved_tensors
        s, need = ctx.s, ctx.needs_input_grad
        w2 = kept[0] if kept else None
        nb, c = y.shape[:2]
        gx = gw = None
        if need[3]:
            build = _build_in_grad(need[0], w2, y, weight, wv)
            yb = (gy.reshape(nb, c, -1), y.reshape(nb, c, -1), cast(bias, y.dtype), wv, s)
            if y.is_cuda:
                gw = scale_triton.channel_grad_bcl(*yb, build)
            else:
                gw = scale_triton.channel_grad_bcl_torch(*yb)
            if build is not None:
                gw, w2 = gw
        if need[0]:
            if w2 is None:
                w2 = _OutputScaleBuild(s)(weight, None, wv)[0]
            gx = torch.matmul(cast(w2, gy.dtype).reshape(c, -1).t(), gy.reshape(nb, c, -1))
            gx = cast(gx.reshape(nb, gx.shape[1], *y.shape[2:]), ctx.x_dtype)
        return gx, None, None, gw, None


class _SharedKeepOutput(torch.autograd.Function):
    """:class:`_KeepOutput` for up to :data:`.scale_triton.MEMBERS` output-mode layers that read the same input — a
    self-attention's q, k and v, a cross-attention's k and v (:mod:`lyco.siblings` finds them) — as **one GEMM**:
    ``[y_0 | y_1 | …] = x·[W_0′; W_1′; …]ᵀ + [b_0 | b_1 | …]``, every ``W_i′`` built into the stacked weight by one
    launch (:func:`.scale_triton.scale_rows_multi`); the members' outputs are views of that one output (column blocks).
    Backward: the members' ∂y side by side (one copy), then what :class:`_KeepOutput` runs per layer once for all —
    the channel sums over ``∂y`` and ``y`` (one launch), the finish with the stacked ``W′`` built again (one launch),
    ``∂x = ∂y·W′`` as one GEMM (no autograd sum of the members' ∂x). Per self-attention the floor runs 3 GEMMs forward,
    3 backward and 2 adds; :class:`_KeepOutput` per member added 3 launches to those (9 more); this op runs 2 forward
    and 4 backward, the GEMMs 3× as wide (issue 7: at SDXL b1 each small launch costs ≈ 2–4 µs of the captured step).

    Numerics: each member's output, ∂w and its share of ∂x are the per-layer op's sums, in one GEMM's order (one
    accumulation over K for ∂x where autograd added three rounded products). The outputs are views of one tensor:
    autograd refuses an in-place change to one of them with its own error (a custom function's multiple views);
    ``LYCO_SHARED_INPUT=0`` turns grouping off."""

    @staticmethod
    def forward(ctx, x, s, *flat):
        ws, bs, wvs = flat[0::3], flat[1::3], flat[2::3]
        w2 = _stacked_weight(ws, wvs, s)
        cd = _compute_dtype(x)  # autocast's for an fp32 x (as _KeepOutput)
        b = None if bs[0] is None else torch.cat([cast(v, cd) for v in bs])
        y = F.linear(cast(x, cd), cast(w2, cd), b)
        ctx.s, ctx.x_dtype, ctx.cs = s, x.dtype, tuple(w.shape[0] for w in ws)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y, b, *ws, *wvs)
        return tuple(y.split(ctx.cs, 1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gys):
        y, b, *rest = ctx.saved_tensors
        n = len(ctx.cs)
        ws, wvs = tuple(rest[:n]), tuple(rest[n:])
        needs = ctx.needs_input_grad
        grads: list = [None] * (2 + 3 * n)
        if all(g is None for g in gys):
            return tuple(grads)
        # a member whose output nobody used: zeros in its columns, and no ∂w (as autograd gives a layer never used)
        gy = torch.cat([y.new_zeros(y.shape[0], c) if g is None else cast(g, y.dtype).reshape(-1, c)
                        for g, c in zip(gys, ctx.cs)], 1)
        s, w2, gw = ctx.s, None, None
        if any(needs[4 + 3 * i] for i in range(n)):
            if y.is_cuda:
                build = ws if needs[0] and all(scale_triton.rows_usable(w, v) for w, v in zip(ws, wvs)) else None
                gw = scale_triton.channel_grad(gy, y, b, wvs, s, build)
                if build is not None:
                    gw, w2 = gw
            else:
                flat = scale_triton.channel_grad_torch(gy, y, b, torch.cat([v.reshape(-1) for v in wvs]), s)
                gw = tuple(g.view(v.shape) for g, v in zip(flat.split(ctx.cs), wvs))
            for i in range(n):
                if needs[4 + 3 * i] and gys[i] is not None:
                    grads[4 + 3 * i] = gw[i]
        if needs[0]:
            if w2 is None:
                w2 = _stacked_weight(ws, wvs, s)
            grads[0] = cast(gy @ cast(w2, gy.dtype), ctx.x_dtype)
        return tuple(grads)


def _stacked_weight(ws, wvs, s: float) -> torch.Tensor:
    """``[W_0′; W_1′; …]`` (:class:`_SharedKeepOutput`): one launch on CUDA where the row kernel runs, else torch's."""
    if ws[0].is_cuda and all(scale_triton.rows_usable(w, v) for w, v in zip(ws, wvs)):
        return scale_triton.scale_rows_multi(ws, wvs, s)
    return torch.cat([scale_triton.scale_rows_torch(w, v, s) for w, v in zip(ws, wvs)])


def shared_keep_output(x: torch.Tensor, parts) -> list[torch.Tensor] | None:
    """Each member's output by :class:`_SharedKeepOutput` for 2-D rows ``x``; ``parts`` per member
    ``(spec, W, b, w, s)`` from :meth:`IA3.shared_part`. None (each layer runs its own op) unless every member has
    the same s, a bias or none alike, one dtype of W and of w, and there are 2 to :data:`.scale_triton.MEMBERS`."""
    if not 2 <= len(parts) <= scale_triton.MEMBERS or x.dim() != 2:
        return None
    _, w0, b0, v0, s0 = parts[0]
    for _, w, b, v, s in parts:
        if (s != s0 or (b is None) != (b0 is None) or w.dtype != w0.dtype or v.dtype != v0.dtype
                or not w.is_contiguous() or w.dim() != 2 or w.shape[1] != x.shape[1]):
            return None
    flat = []
    for _, w, b, v, _ in parts:
        flat += [w, b, v]
    return list(_SharedKeepOutput.apply(x, float(s0), *flat))


@register
class IA3(Algorithm):
    name = "ia3"
    keys = frozenset({"weight", "on_input"})
    detect_keys = ("on_input",)
    frozen_keys = frozenset({"on_input"})
    kinds = (LINEAR, CONV1D, CONV2D, CONV3D)
    options = {"train_on_input": False}
    weight_independent = False
    shared_rebuild = "ia3"

    def create(self, spec, opts, weight=None, generator=None) -> Tensors:
        on_input = bool(opts.get("train_on_input", False))
        c = spec.in_dim * spec.groups if on_input else spec.out_dim
        shape = (1, c) + (1,) * len(spec.kernel) if spec.is_conv else (c,)
        return {"weight": torch.zeros(shape, dtype=torch.float32),
                "on_input": torch.tensor(int(on_input), dtype=torch.int64)}

    def scale(self, t):
        return 1.0

    def delta_weight(self, t, spec, weight=None):
        if weight is None:
            raise ValueError("IA3 needs the base weight (ΔW = W ⊙ w)")
        w = t["weight"]
        return weight * ia3_row_col_scale(w, spec, ia3_on_input(t)).to(weight.dtype)

    def delta_bias(self, t, spec, bias=None):
        return None  # the bias is not scaled (merge semantics; see module doc)

    def forward_delta(self, x, t, spec, weight, bias, base_out):
        w = t["weight"].reshape(-1).to(x.dtype)
        if ia3_on_input(t):
            # op(x ⊙ w, W) without bias == op(x, W ⊙ w_columns); channel scaling commutes with padding
            return layer_op(x * input_channel_view(w, spec, x), spec, weight.to(x.dtype))
        y = base_out if bias is None else base_out - channel_view(bias.to(base_out.dtype), spec, base_out)
        return y * channel_view(w, spec, y)

    def forward_accumulate(self, acc, x, t, spec, weight, bias, base_out, multiplier, inplace=False):
        """Output mode: ``acc + (m·w) ⊙ (f(x) − b)`` as one ``addcmul`` (the scale folded into w)."""
        if ia3_on_input(t):
            return super().forward_accumulate(acc, x, t, spec, weight, bias, base_out, multiplier, inplace)
        w = t["weight"].reshape(-1)
        c = channel_view((w * multiplier if multiplier != 1.0 else w).to(acc.dtype), spec, acc)
        y = base_out if bias is None else base_out - channel_view(bias.to(base_out.dtype), spec, base_out)
        return torch.addcmul(acc, y, c)

    def prefers_rebuild_for(self, t, spec):
        # Input mode: ``op(x ⊙ (1 + m·w), W, b)`` replaces the frozen op — one GEMM per layer where the
        # delta path runs the frozen op *and* ``op(x ⊙ w, W)``; it keeps x for ∂w as the delta path does
        # and no weight-sized tensor (LyCORIS scales the weight instead: W ⊙ (1 + w) per step and a
        # weight-gradient GEMM).
        # Output mode (decision, GPU run 7, H200, SD1.5 b8): ``op(x, W + m·(W ⊙ w))`` through the rebuilt
        # op (x kept, W′ rebuilt in backward, ∂w = m·⟨E_j, W_j⟩ by hand) rather than the bypass's
        # ``addcmul`` on f(x) − b, which keeps f(x) − b of every layer: peak 8.72 vs 10.64 GiB (LyCORIS
        # 9.23, PEFT 10.62), one-graph device time 71.3 vs 85.9 ms (PEFT 79.6), eager within noise
        # (p10 86.8 vs 90.6 ms). Layers the rebuilt op does not cover (norms, padding modes) stay on
        # the bypass. In captured steps, linear layers with ≥ 512 inputs keep the output instead of x
        # (_KeepOutput, issue 7 run 163: SD1.5 b8 75.40 → 73.41 ms, SDXL b4 ≈ 232 → 202.2 ms).
        if ia3_on_input(t):
            return True
        return rebuild_supports(spec)

    def shared_part(self, x, t, spec, weight, bias, multiplier):
        """``(w, s)`` where this output-mode linear layer would take :class:`_KeepOutput` on the 2-D rows ``x`` (and x
        is not a GEGLU's output, which that op takes apart): what :func:`shared_keep_output` runs for a group of
        layers sharing x (:mod:`lyco.siblings`); else None."""
        if ia3_on_input(t) or spec.kind != LINEAR or not _keep_output(x, spec, weight, bias):
            return None
        if regen.geglu_input(x) is not None:
            return None
        return t["weight"], float(multiplier)

    def rebuild_op(self, x, t, spec, weight, bias, multiplier):
        if not ia3_on_input(t):
            # output mode: op(x, W + m·(W ⊙ w)) with W′ rebuilt in backward, keeping y and ∂w from ∂y and y where
            # _keep_output holds (_KeepOutput's doc), else keeping x (the rebuilt op: ∂w through ∂W′)
            if _keep_output(x, spec, weight, bias):
                if spec.kind != LINEAR:
                    return _KeepOutputConv.apply(x, weight, bias, t["weight"], float(multiplier))
                # a GEGLU's output: the op takes the projection's output and runs the GEGLU's backward in one pass
                # (.regen.geglu_input, LYCO_GEGLU_FUSE, change 120)
                p = regen.geglu_input(x)
                # on rows, reshaped after: F.linear on a 3-D x inside the Function would return a view of a tensor
                # autograd never sees, and a GEGLU after it could not be found from its halves' base
                x2 = x.reshape(-1, x.shape[-1])
                # this op's output may be a GEGLU's projection output: a link its consumer's GEGLU kernel can hand the
                # column sums of ∂w to (scale_triton.ChannelLink, change 121), found there on p
                link = _link(spec, bias)
                if p is not None:
                    y = _KeepOutput.apply(p, weight, bias, t["weight"], float(multiplier), x2.detach(),
                                          getattr(p, "_lyco_channel_link", None), link)
                else:
                    y = _KeepOutput.apply(x2, weight, bias, t["weight"], float(multiplier), None, None, link)
                if link is not None:
                    y._lyco_channel_link = link
                return y if x2 is x else y.view(*x.shape[:-1], y.shape[-1])
            # a link for a GEGLU consumer's channel sums on linear layers (change 121; the projections under the
            # 512-input line: SD1.5's 64×64 level) — then no ∂W′ GEMM in backward
            link = _link(spec, bias) if spec.kind == LINEAR and torch.is_grad_enabled() else None
            y = rebuilt_op(x, spec, weight, bias, _OutputScaleBuild(float(multiplier), link), t["weight"])
            if link is not None and y is not None:
                (y if y._base is None else y._base)._lyco_channel_link = link
            return y
        w = t["weight"].reshape(-1)
        s = 1 + (w * multiplier if multiplier != 1.0 else w)
        return layer_op(x * input_channel_view(s.to(x.dtype), spec, x), spec, weight, bias)

    def describe(self, t):
        return {"rank": None, "alpha": None, "scale": 1.0, "on_input": ia3_on_input(t)}

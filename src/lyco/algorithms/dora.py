"""DoRA weight decomposition (Liu et al. 2024) on top of LoRA / LoHa / LoKr (and GLoRA).

File tensor ``dora_scale`` holds the magnitude m, on one of two axes:
  * output axis, shape ``(out, 1, …)`` — LyCORIS ≥ 3.2 default (``wd_on_output``), PEFT;
  * input axis, shape ``(1, in, 1, …)`` — LyCORIS < 3.1.1, what A1111/InvokeAI assume.
The axis is detected from the shape (``dora_scale.shape[0] == out`` → output axis), as
ComfyUI does. Both are read; we *write* the output axis by default (LyCORIS, ComfyUI, Forge
and PEFT read it; A1111 and InvokeAI need ``dora_axis="in"``), and record the axis in the
file's metadata (``lyco_dora_axis``).

Semantics (decided here, following ComfyUI/A1111's weight patching):
  W_c = W + γΔW            (γΔW = the inner algorithm's delta, scale included)
  n   = ‖W_c‖ along the magnitude axis (+ fp32 eps, as LyCORIS)
  W_d = W_c · m / n
  merged at multiplier s:   W + s·(W_d − W)      → linear in s, ΔW_dora = W_d − W.
Deliberate differences:
  * LyCORIS's own merge interpolates only the norm factor (W_c·(s(m/n−1)+1)), so at s=0 it
    yields W+γΔW, not W. Loaders interpolate the whole DoRA delta; we follow the loaders.
    Both agree at s = 1.
  * One ComfyUI version normalises by the norm of the *original* W on the output axis; the
    DoRA definition (and LyCORIS, PEFT) use the merged W_c. We use W_c.

Gradient through the norm (training only; the forward value is the same either way):
  * default: the exact gradient of the function above, n included (LyCORIS);
  * ``dora_detach_norm`` (``lyco.create(..., dora=True, dora_detach_norm=True)``, the trainer's
    ``[network] options``; stored in ``AdapterLayer.opts``): n = ‖W_c‖ treated as a constant
    in backward, as the DoRA paper recommends (§4.3, "we suggest treating ‖V+ΔV‖_c as a constant
    … detaching it from the gradient graph") and PEFT does by default. Then W_c is built and reduced
    under ``no_grad``: nothing weight-sized is saved and the backward has no weight-sized pass.
    The magnitude still gets its exact gradient; the directional factors lose the norm's term.
    Not the default: it changes the training dynamics relative to LyCORIS-trained files.
"""

from __future__ import annotations

import functools

import torch

from . import lowrank_triton
from .base import Algorithm, LayerSpec, channel_view, input_channel_view, layer_op
from .casts import cast_factor
from .rebuild import cast, like, merged_build, rebuilt_op, rowdot, supports as rebuild_supports

_EPS = torch.finfo(torch.float32).eps


def magnitude_axis(dora_scale: torch.Tensor, spec: LayerSpec) -> str:
    if dora_scale.shape[0] == spec.out_dim and dora_scale.numel() == spec.out_dim:
        return "out"
    return "in"


def weight_norm(w: torch.Tensor, axis: str) -> torch.Tensor:
    """‖w‖ per output row (shape (out,1,…)) or per input column (shape (1,in,1,…))."""
    if axis == "out":
        return w.reshape(w.shape[0], -1).norm(dim=1).reshape((w.shape[0],) + (1,) * (w.dim() - 1))
    wt = w.transpose(0, 1)
    n = wt.reshape(wt.shape[0], -1).norm(dim=1)
    return n.reshape((1, w.shape[1]) + (1,) * (w.dim() - 2))


class _RowNorm(torch.autograd.Function):
    """‖w_j‖ per row of a 2-D ``w``, reduced in ``dtype`` (fp32 for bf16 weights, no wide copy of
    ``w``), with the one-line backward ``∂n_j/∂w_j = w_j / n_j`` in ``w``'s dtype: three small
    kernels instead of autograd's generic norm backward (≈ 8, four of them weight-sized in fp32)."""

    @staticmethod
    def forward(ctx, w, dtype):
        n = torch.linalg.vector_norm(w, dim=1, dtype=dtype)
        ctx.save_for_backward(w, n)
        return n

    @staticmethod
    def backward(ctx, grad_n):
        w, n = ctx.saved_tensors
        # a zero row has a zero gradient (the subgradient torch uses), never 0/0
        s = grad_n / n.clamp_min(torch.finfo(n.dtype).tiny)
        return w * s.to(w.dtype)[:, None], None


def row_norm(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _RowNorm.apply(w, dtype)


class _Gains(torch.autograd.Function):
    """From the magnitude ``mag`` and the (ε-added) norm ``n`` (wide dtype) at multiplier ``m``:
    ``g = m·mag/n`` and returns ``(g − m)`` in ``dt1`` and ``g`` in ``dt2``, g computed in the wide
    dtype (g − m is small: it needs the mantissa before the cast). One Function instead of ≈ 6
    forward and ≈ 9 backward vector-sized autograd ops per layer (casts, the quotient rule)."""

    @staticmethod
    def forward(ctx, mag, n, m, dt1, dt2):
        g = mag / n                       # mixed dtypes promote to n's (wide) dtype
        if m != 1.0:
            g.mul_(m)
        ctx.save_for_backward(n, g)
        ctx.m, ctx.mag_dtype = m, mag.dtype
        return (g - m).to(dt1), g.to(dt2)

    @staticmethod
    def backward(ctx, g1, g2):
        n, g = ctx.saved_tensors
        gg = torch.zeros_like(g) if g1 is None else g1.to(g.dtype)
        if g2 is not None:
            gg.add_(g2)
        tq = gg / n                        # ∂L/∂g · 1/n
        gmag = gn = None
        if ctx.needs_input_grad[0]:
            gmag = (tq * ctx.m if ctx.m != 1.0 else tq).to(ctx.mag_dtype)
        if ctx.needs_input_grad[1]:
            gn = (tq * g).neg_()           # ∂g/∂n = −g/n
        return gmag, gn, None, None, None


class _LoraDoraBuild:
    """DoRA over LoRA (magnitude on the output axis) for :mod:`.rebuild`, at multiplier ``s``:

    ``W′ = W + γ·U·D`` (one ``addmm`` in the weight's dtype), ``n = ‖W′‖_row + ε`` (reduced in fp32),
    ``g = mag / n``, ``W_eff = W + s·(g ⊙ W′ − W) = (W + s·γ·U·D) + s·(g − 1) ⊙ W′`` — one ``addcmul``
    with ``s·(g − 1)`` computed in fp32 and cast once (it keeps its mantissa), the weight rounded once.

    Backward by hand from ``E = ∂L/∂W_eff`` (derivation in benchmarks/NOTES.md, "rebuilt op"):
    ``∂g_j = s·⟨E_j, W′_j⟩``, ``∂mag = ∂g / n``, ``∂n_j = −∂g_j·g_j / n_j``, and
    ``∂(U·D) = γ·[s·g ⊙ E + (∂n / ‖W′‖) ⊙ W′]`` (the second term dropped with a detached norm), so
    ``∂U = ∂(UD)·Dᵀ``, ``∂D = Uᵀ·∂(UD)``: weight-sized work and two skinny GEMMs, no autograd.

    The row vectors the backward scales by are formed in the forward (:meth:`forward_aux`), each in the
    dtype its consumer needs (``out=`` casts in the same kernel): the backward's vector work was ≈ 12
    small kernels per layer (casts and the quotient rule), now two. GPU run 29 (H100, SD1.5 b8,
    ``results/run29_h100_dora_vec/``): 8376 → 6840 kernels per step, one-graph step 89.3 → 87.8 ms
    (LyCORIS 104.8), eager 210.9 ms pooled over two rounds (LyCORIS 300.1). On CUDA bf16/fp16 the build, the
    rebuild and this backward run on :mod:`.lowrank_triton`'s fused kernels instead (W′ kept in registers, never
    stored; run 40: 87.8 → 79.4 ms as a graph, LyCORIS 104.9), the torch code below everywhere else."""

    def __init__(self, gain: float, s: float, detach_norm: bool):
        self.gain, self.s, self.detach = gain, s, detach_norm
        self.fused = False  # set by forward_aux: the Triton kernels of lowrank_triton took this layer

    @staticmethod
    def _factors(w, up, down):
        # cast_factor: inside the rebuilt op's forward and backward (lyco train's step) the fp32 factors are views of
        # one cast of their storage per step, not two casts per layer and direction (NOTES change 86)
        w2 = w if w.dim() == 2 else w.reshape(w.shape[0], -1)
        up2 = cast_factor(up, w.dtype).reshape(up.shape[0], -1)
        return w2, up2, cast_factor(down, w.dtype).reshape(up2.shape[1], -1)

    def __call__(self, w, b, up, down, mag):
        """Differentiable (autograd) form: under ``torch.compile`` and as the reference."""
        w2, up2, down2 = self._factors(w, up, down)
        wide = torch.promote_types(torch.promote_types(mag.dtype, w.dtype), torch.float32)
        wc = torch.addmm(w2, up2, down2, alpha=self.gain)
        if self.detach:
            with torch.no_grad():
                n = torch.linalg.vector_norm(wc, dim=1, dtype=wide).add_(_EPS)
        else:
            n = row_norm(wc, wide) + _EPS
        sgm1, _ = _Gains.apply(mag.reshape(-1), n, self.s, w.dtype, w.dtype)  # s·(g − 1)
        lin = wc if self.s == 1.0 else torch.addmm(w2, up2, down2, alpha=self.gain * self.s)
        return torch.addcmul(lin, wc, sgm1[:, None]).reshape(w.shape), b

    def forward_aux(self, w, b, up, down, mag):
        """W_eff, and the row vectors the backward needs, each formed once here so that the backward's
        vector work is two kernels (``∂mag`` and the norm term's coefficient), not ≈ 12:
        ``s·(g − 1)`` (w's dtype), ``n/s`` (for ``∂mag = dgr/(n/s)``), ``α = γ·s·g`` (w's dtype, the scale
        of E in ``∂(UD)``) and ``κ = g/(n·‖W′‖)`` (the norm term's, absent with a detached norm)."""
        w2, up2, down2 = self._factors(w, up, down)
        if lowrank_triton.usable(w2, up2.shape[1]):
            # CUDA, bf16/fp16, rank ≤ 64: lowrank_triton's fused kernels (two launches here, three in the backward;
            # ≈ 11 weight-sized passes per step instead of ≈ 24, counted from the code)
            self.fused = True
            w_eff, vec = lowrank_triton.build(w2, up2, down2, self.gain, self.s, mag=mag)
            return like(w_eff, w.shape, w.dtype), b, (vec,)
        wide = torch.promote_types(torch.promote_types(mag.dtype, w.dtype), torch.float32)
        wc = torch.addmm(w2, up2, down2, alpha=self.gain)
        norm = torch.linalg.vector_norm(wc, dim=1, dtype=wide)
        n = norm + _EPS
        g = torch.div(mag.reshape(-1), n)                  # mixed dtypes compute in (and give) n's wide dtype
        s = self.s
        if s == 1.0:
            sgm1 = torch.sub(g, 1.0, out=torch.empty_like(g, dtype=w.dtype))
            nd = n
        else:
            sgm1 = torch.mul(g.sub(1.0), s, out=torch.empty_like(g, dtype=w.dtype))
            nd = n / s
        alpha = torch.mul(g, self.gain * s, out=torch.empty_like(g, dtype=w.dtype))
        kappa = None if self.detach else torch.div(g, torch.mul(n, norm.clamp_min(torch.finfo(norm.dtype).tiny)))
        lin = wc if s == 1.0 else torch.addmm(w2, up2, down2, alpha=self.gain * s)
        w_eff = like(torch.addcmul(lin, wc, sgm1.unsqueeze(1)), w.shape, w.dtype)
        return w_eff, b, (sgm1, nd, alpha, kappa)

    def recompute(self, keep, w, b, up, down, mag):
        """W_eff again from the saved row vectors (one ``addmm`` and one ``addcmul``), and what
        :meth:`vjp` needs."""
        w2, up2, down2 = self._factors(w, up, down)
        if self.fused:
            vec = keep[0]
            w_eff, _ = lowrank_triton.build(w2, up2, down2, self.gain, self.s, vec=vec)
            return like(w_eff, w.shape, w.dtype), (up2, down2, w2, vec)
        sgm1, nd, alpha, kappa = keep
        wc = torch.addmm(w2, up2, down2, alpha=self.gain)
        lin = wc if self.s == 1.0 else torch.addmm(w2, up2, down2, alpha=self.gain * self.s)
        return like(torch.addcmul(lin, wc, sgm1.unsqueeze(1)), w.shape, w.dtype), (up2, down2, wc, nd, alpha, kappa)

    def vjp(self, aux, theta, gw, gb, needs):
        """With ``dgr_j = ⟨E_j, W′_j⟩``: ``∂mag = s·dgr/n``; ``∂(UD) = α ⊙ E − γ·s·(dgr·κ) ⊙ W′`` (the second
        term is ``γ·(∂n/‖W′‖) ⊙ W′`` with ``∂n = −s·dgr·g/n``; dropped with a detached norm)."""
        up, down, mag = theta
        if self.fused:
            up2, down2, w2, vec = aux
            h, gu, gmag = lowrank_triton.backward(like(gw, w2.shape, w2.dtype), w2, up2, down2, vec, self.gain,
                                               self.s, self.detach, needs[0] or needs[1], mag.dtype)
            return (like(gu, up.shape, up.dtype) if needs[0] else None,
                    like(up2.t() @ h, down.shape, down.dtype) if needs[1] else None,
                    gmag.view(mag.shape) if needs[2] else None)
        up2, down2, wc, nd, alpha, kappa = aux
        e = like(gw, wc.shape, wc.dtype)
        dgr = rowdot(e, wc)
        gmag = None
        if needs[2]:
            gmag = torch.div(dgr, nd, out=torch.empty_like(nd, dtype=mag.dtype)).view(mag.shape)
        gup = gdown = None
        if needs[0] or needs[1]:
            h = e * alpha.unsqueeze(1)
            if kappa is not None:
                beta = torch.mul(dgr, kappa, out=torch.empty_like(dgr, dtype=e.dtype))
                h = torch.addcmul(h, wc, beta.unsqueeze(1), value=-self.gain * self.s)
            if needs[0]:
                gup = like(h @ down2.t(), up.shape, up.dtype)
            if needs[1]:
                gdown = like(up2.t() @ h, down.shape, down.dtype)
        return gup, gdown, gmag


def init_magnitude(weight: torch.Tensor, axis: str = "out") -> torch.Tensor:
    return weight_norm(weight.detach().float(), axis)


class DoRA(Algorithm):
    is_dora = True
    weight_independent = False

    def __init__(self, inner: Algorithm):
        self.inner = inner
        self.name = inner.name
        self.keys = frozenset(inner.keys | {"dora_scale"})
        self.frozen_keys = inner.frozen_keys
        self.kinds = inner.kinds
        self.options = inner.options
        self.rank_dropout_on = getattr(inner, "rank_dropout_on", "output")

    def __repr__(self):
        return f"DoRA({self.inner.name})"

    def rank(self, t):
        return self.inner.rank(t)

    def scale(self, t):
        return self.inner.scale(t)

    def validate_options(self, opts):
        return self.inner.validate_options(opts)

    def create(self, spec, opts, weight=None, generator=None):
        raise TypeError("create DoRA through the inner algorithm with dora=True")

    def _parts(self, t, spec, weight, detach_norm=False):
        m = t["dora_scale"]
        axis = magnitude_axis(m, spec)
        # fp32 or wider, never bf16/fp16 (m/‖W′‖ − 1 is small: it needs the mantissa)
        dt = torch.promote_types(torch.promote_types(m.dtype, weight.dtype), torch.float32)
        m, w = m.to(dt), weight.to(dt)
        wc = w + self.inner.delta_weight(t, spec, w).to(w.dtype)
        n = weight_norm(wc.detach() if detach_norm else wc, axis) + _EPS
        m = m.reshape(n.shape)
        return axis, wc, n, m

    def delta_weight(self, t, spec, weight=None):
        if weight is None:
            raise ValueError("DoRA needs the base weight")
        axis, wc, n, m = self._parts(t, spec, weight)
        return wc * (m / n) - weight.to(wc.dtype)

    def delta_bias(self, t, spec, bias=None):
        return self.inner.delta_bias(t, spec, bias)

    def forward_delta(self, x, t, spec, weight, bias, base_out, rank_mask=None, detach_norm=False):
        # y_d = op(x, W_d) = scale ⊙ (W x + γΔW x) for the output axis, op(x⊙scale, W_c) for input.
        axis, wc, n, m = self._parts(t, spec, weight, detach_norm)
        y_nb = base_out - channel_view(bias.to(base_out.dtype), spec, base_out) if bias is not None else base_out
        if axis == "out":
            kw = {"rank_mask": rank_mask} if rank_mask is not None else {}
            inner = self.inner.forward_delta(x, t, spec, weight, bias, base_out, **kw)
            gm1 = (m / n - 1).reshape(-1)  # g − 1 in the wide dtype, then cast: no cancellation
            gm1v = channel_view(gm1.to(x.dtype), spec, base_out)
            gv = channel_view((gm1 + 1).to(x.dtype), spec, base_out)
            return gm1v * y_nb + gv * inner
        g = (m / n).to(x.dtype)
        if spec.is_conv and spec.groups != 1:  # per-input-channel scale is per group: materialise
            return layer_op(x, spec, (wc * g.to(wc.dtype)).to(x.dtype)) - y_nb
        gx = input_channel_view(g.reshape(-1), spec, x)
        return layer_op(x * gx, spec, wc.to(x.dtype)) - y_nb

    def forward_accumulate(self, acc, x, t, spec, weight, bias, base_out, multiplier, inplace=False,
                           detach_norm=False):
        """``acc + m·[(g−1)⊙(f(x)−b) + g⊙Δy_inner]`` with g = mag/‖W′‖ per output row:
        one ``addcmul`` for the first term, the second folded into the inner's last GEMM when the
        inner takes a row scale (LoRA), else one more ``addcmul``. ``detach_norm``: ‖W′‖ is a
        constant in backward (see the module doc)."""
        mag = t["dora_scale"]
        if magnitude_axis(mag, spec) != "out":
            if detach_norm:
                d = self.forward_delta(x, t, spec, weight, bias, base_out, detach_norm=True)
                return torch.add(acc, d.to(acc.dtype), alpha=multiplier)
            return super().forward_accumulate(acc, x, t, spec, weight, bias, base_out, multiplier, inplace)
        y_nb = base_out - channel_view(bias.to(base_out.dtype), spec, base_out) if bias is not None else base_out
        gain = self.inner._gain(t) if getattr(self.inner, "name", "") == "lora" else None
        up = t.get("lora_up.weight")
        if (gain is not None and not isinstance(gain, torch.Tensor) and "lora_mid.weight" not in t
                and up.dtype == weight.dtype == t["lora_down.weight"].dtype
                and (spec.kind == "linear" or (spec.groups == 1 and spec.padding_mode == "zeros"))):
            # W′ = W + γ·U·D as one addmm in the weight's dtype, its row norms reduced in fp32 (no
            # fp32 copy of W or W′); g, g − 1 in fp32, cast once. m·g goes into the rows of up.
            up2 = up.reshape(up.shape[0], -1)
            wide = torch.promote_types(torch.promote_types(mag.dtype, weight.dtype), torch.float32)
            if detach_norm:
                # W′ and its norm without autograd: m·g = mag · (m / (‖W′‖+ε)), one mixed-dtype
                # multiply (mag keeps its own dtype, the product is wide), exact gradient for mag
                with torch.no_grad():
                    wc = torch.addmm(weight.reshape(weight.shape[0], -1), up2,
                                     t["lora_down.weight"].reshape(up2.shape[1], -1), alpha=gain)
                    n = torch.linalg.vector_norm(wc, dim=1, dtype=wide).add_(_EPS)
                    del wc
            else:
                wc = torch.addmm(weight.reshape(weight.shape[0], -1), up2,
                                 t["lora_down.weight"].reshape(up2.shape[1], -1), alpha=gain)
                n = row_norm(wc, wide) + _EPS
            gm1, g = _Gains.apply(mag.reshape(-1), n, float(multiplier), acc.dtype, up2.dtype)
            pre = torch.addcmul(acc, y_nb, channel_view(gm1, spec, acc))  # new: the LoRA adds into it in place
            t2 = dict(t)
            t2["lora_up.weight"] = (up2 * g[:, None]).reshape(up.shape)
            return self.inner.forward_accumulate(pre, x, t2, spec, weight, bias, base_out, 1.0,
                                                 not torch.compiler.is_compiling())
        _, _, n, mag = self._parts(t, spec, weight, detach_norm)
        gm1 = mag.reshape(-1) / n.reshape(-1) - 1
        c1 = channel_view((gm1 * multiplier).to(acc.dtype), spec, acc)
        c2 = channel_view(((gm1 + 1) * multiplier).to(acc.dtype), spec, acc)
        pre = torch.addcmul(acc, y_nb, c1)
        inner = self.inner.forward_delta(x, t, spec, weight, bias, base_out)
        return torch.addcmul(pre, inner.to(acc.dtype), c2)

    def _merged(self, t, spec, weight, bias, multiplier, detach_norm=False):
        """:meth:`merged` (``W + m·(W_d − W)``, ``b + m·Δb``) with the norm optionally detached."""
        axis, wc, n, mg = self._parts(t, spec, weight, detach_norm)
        wd = wc * (mg / n)
        w2 = wd if multiplier == 1.0 else torch.lerp(weight.to(wd.dtype), wd, multiplier)
        db = self.inner.delta_bias(t, spec, bias)
        if db is not None:
            db = db * multiplier
            bias = db if bias is None else bias + db.to(bias.dtype)
        return w2.to(weight.dtype), bias

    # -- rebuild path ---------------------------------------------------------------------
    def prefers_rebuild_for(self, t, spec):
        # Decision (benchmarks/NOTES.md, "rebuilt op"; GPU run 8, H200, SD1.5 b8): DoRA trains as
        # op(x, W_d) with W_d rebuilt in backward. The bypass keeps f(x) − b of every layer for ∂g and runs
        # three extra skinny GEMMs and two output-sized passes (peak 12.41 GiB, one-graph step 111.9 ms);
        # the rebuild keeps x only and pays one weight-gradient GEMM plus weight-sized work (8.76 GiB,
        # 84.6 ms; PEFT 14.94 / 128.8, LyCORIS 9.79 / 98.0).
        return rebuild_supports(spec)

    def rebuild_op(self, x, t, spec, weight, bias, multiplier, detach_norm=False):
        """``op(x, W + s·(W_d − W))`` through :mod:`.rebuild` (``x`` kept, ``W_d`` rebuilt in backward).
        LoRA inside, magnitude on the output axis (what LyCORIS, PEFT and lyco write): the weight is
        built as in :meth:`forward_accumulate` — ``W′ = W + γ·U·D`` as one ``addmm`` in the weight's
        dtype, its row norms reduced in fp32, ``s·(g − 1)`` in fp32 cast once, and
        ``W_eff = (W + s·γ·U·D) + s·(g − 1) ⊙ W′`` as one ``addcmul`` (g − 1 keeps its mantissa; the
        weight is rounded once). Otherwise the definition (:meth:`delta_weight`, in fp32)."""
        mag = t["dora_scale"]
        s = float(multiplier)
        gain = self.inner._gain(t) if getattr(self.inner, "name", "") == "lora" else None
        if (magnitude_axis(mag, spec) == "out" and gain is not None and not isinstance(gain, torch.Tensor)
                and "lora_mid.weight" not in t and (spec.kind == "linear" or spec.groups == 1)):
            build = _LoraDoraBuild(gain, s, detach_norm)
            return rebuilt_op(x, spec, weight, bias, build, t["lora_up.weight"], t["lora_down.weight"], mag)
        build, keys = merged_build(self, t, spec, s, merged=functools.partial(self._merged, detach_norm=detach_norm),
                                   to_weight_dtype=False)
        return rebuilt_op(x, spec, weight, bias, build, *(t[k] for k in keys))

    def export(self, t):
        return self.inner.export(t)

    def describe(self, t):
        d = self.inner.describe(t)
        d["dora"] = True
        return d


_CACHE: dict[str, DoRA] = {}


def wrap(inner: Algorithm) -> DoRA:
    if not inner.supports_dora:
        from ..errors import ConfigError
        raise ConfigError(f"algorithm {inner.name!r} does not support DoRA weight decomposition")
    if inner.name not in _CACHE:
        _CACHE[inner.name] = DoRA(inner)
    return _CACHE[inner.name]

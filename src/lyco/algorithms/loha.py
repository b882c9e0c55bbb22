"""LoHa: the Hadamard product of two low-rank products (Hyeon-Woo et al. 2022, FedPara).

File tensors (LyCORIS/kohya):
  plain   ``hada_w1_a (out, r)``, ``hada_w1_b (r, in·∏k)``, ``hada_w2_a (out, r)``, ``hada_w2_b (r, in·∏k)``
          (conv factors are 2-D, the kernel flattened into the columns, row-major)
  Tucker  (k×k convs only) ``hada_w*_a (r, out)``, ``hada_w*_b (r, in)``, ``hada_t* (r, r, *k)``:
          note the orientation flip of the "a" factors.
  ``alpha`` 0-d; γ = alpha / r with r = ``hada_w1_b.shape[0]``.

ΔW = γ · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), reshaped to the weight; Tucker: each half is
``R[p,q,…] = Σ_ij t[i,j,…]·a[i,p]·b[j,q]``.

Structured forward: (A1B1) ⊙ (A2B2) = KRa @ KRb with the row-wise Khatri–Rao product
``KRa[o, i·r2+j] = A1[o,i]·A2[o,j]`` (out, r1·r2) and the column-wise one
``KRb[i·r2+j, c] = B1[i,c]·B2[j,c]`` (r1·r2, in·∏k): a rank-r1·r2 LoRA. It is used when it is
cheaper than materialising ΔW. (The Tucker form is likewise a rank-r1·r2 Tucker with core
``T[(i,i'),(j,j'),…] = t1[i,j,…]·t2[i',j',…]``.)

rs-LoRA and ``scalar`` as in lora.py (alpha stored as α·√r; ``scalar`` folded into ``hada_w1_a``).

Deliberate differences from LyCORIS: γ is applied once everywhere (its merge path applies γ²,
see ``_gain``); the bypass path is structured (LyCORIS materialises ΔW for every layer except
plain linears).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import (
    CONV_KINDS, LINEAR, Algorithm, LayerSpec, Tensors, accumulate_conv1x1, accumulate_linear, alpha_scale,
    alpha_tensor, layer_op, rebuild_tucker, register,
)
from . import factor_batch, factor_triton, lowrank
from .rebuild import cast

_CONV_FN = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}

#: largest r1·r2 for the Khatri–Rao path: beyond it the (…, r1·r2) intermediate gets big
MAX_KHATRI_RAO_RANK = 1024


def _normal(shape, std, generator=None):
    w = torch.empty(shape, dtype=torch.float32)
    w.normal_(0.0, std, generator=generator)
    return w


def loha_shapes(spec: LayerSpec, rank: int, tucker: bool) -> dict[str, tuple[int, ...]]:
    if tucker and spec.is_kxk_conv:
        half = {"a": (rank, spec.out_dim), "b": (rank, spec.in_dim), "t": (rank, rank) + spec.kernel}
    else:
        half = {"a": (spec.out_dim, rank), "b": (rank, spec.flat_in)}
    return {f"hada_{k}{i}" if k == "t" else f"hada_w{i}_{k}": s for i in (1, 2) for k, s in half.items()}


class _HadaProduct(torch.autograd.Function):
    """``(a1 @ b1) ⊙ (a2 @ b2)`` that keeps only the four factors for backward and rebuilds the
    two products there (two out×in matrices are never held between forward and backward)."""

    @staticmethod
    def forward(a1, b1, a2, b2):
        return (a1 @ b1) * (a2 @ b2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        a1, b1, a2, b2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        ga1 = gb1 = ga2 = gb2 = None
        if need[0] or need[1]:
            g1 = g * (a2 @ b2)
            ga1 = g1 @ b1.t() if need[0] else None
            gb1 = a1.t() @ g1 if need[1] else None
            del g1
        if need[2] or need[3]:
            g2 = g * (a1 @ b1)
            ga2 = g2 @ b2.t() if need[2] else None
            gb2 = a2.t() @ g2 if need[3] else None
        return ga1, gb1, ga2, gb2


def hada_product(a1, b1, a2, b2) -> torch.Tensor:
    """``(a1 @ b1) ⊙ (a2 @ b2)``; recomputes the products in backward when gradients are needed."""
    if torch.is_grad_enabled() and any(v.requires_grad for v in (a1, b1, a2, b2)):
        return _HadaProduct.apply(a1, b1, a2, b2)
    return (a1 @ b1) * (a2 @ b2)


def khatri_rao_rows(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """``K[o, i·r2+j] = a1[o,i]·a2[o,j]`` for (out, r1), (out, r2) → (out, r1·r2)."""
    return (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)


def khatri_rao_cols(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """``K[i·r2+j, c] = b1[i,c]·b2[j,c]`` for (r1, n), (r2, n) → (r1·r2, n)."""
    return (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])


def khatri_rao_pair(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor):
    """``(khatri_rao_rows(a1, a2), khatri_rao_cols(b1, b2))``: LoHa's up and down. On CUDA bf16/fp16 by one
    Triton launch forward and one backward (:mod:`.factor_triton`: in torch they are two broadcast multiplies
    and, through autograd, four multiplies and four reductions — 8.1 ms per SD1.5 b8 step on an H100, run
    52); elsewhere the torch forms above. The four factors share a device and dtype (the callers cast them)."""
    if factor_triton.usable(a1, factor_triton.kr_inner(a1.shape[1], a2.shape[1])):
        return factor_triton.khatri_rao(a1, a2, b1, b2)
    return khatri_rao_rows(a1, a2), khatri_rao_cols(b1, b2)


def khatri_rao_pays(spec: LayerSpec, r12: int, tucker: bool = False) -> bool:
    """Whether the rank-r1·r2 structured path costs fewer multiply-adds per output position than
    running the layer with a materialised ΔW (out·in·∏k)."""
    if r12 > MAX_KHATRI_RAO_RANK:
        return False
    dense = spec.out_dim * spec.flat_in
    if tucker:
        # the 1×1 down conv runs before the stride, on ≈ ∏stride input positions per output one
        stride = math.prod(spec.stride) if spec.stride else 1
        cost = r12 * spec.in_dim * stride + r12 * r12 * spec.kernel_numel + r12 * spec.out_dim
    else:
        cost = r12 * (spec.flat_in + spec.out_dim)
    return cost < dense


@register
class LoHa(Algorithm):
    name = "loha"
    keys = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                      "alpha", "scalar"})
    detect_keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    options = {"use_tucker": False, "use_scalar": False, "rs_lora": False}
    supports_dora = True

    def create(self, spec, opts, weight=None, generator=None) -> Tensors:
        r = int(opts["rank"])
        alpha = opts.get("alpha")
        alpha = float(r if alpha in (None, 0) else alpha)
        if opts.get("rs_lora"):
            alpha = alpha * math.sqrt(r)  # stored so that alpha/r == α/√r
        shapes = loha_shapes(spec, r, bool(opts.get("use_tucker")))
        use_scalar = bool(opts.get("use_scalar"))
        t: Tensors = {}
        # LyCORIS's LohaModule draws in this order; keeping it makes a seeded global RNG give
        # the same tensors as LyCORIS.
        if "hada_t1" in shapes:
            t["hada_t1"] = _normal(shapes["hada_t1"], 0.1, generator)
            t["hada_t2"] = _normal(shapes["hada_t2"], 0.1, generator)
        t["hada_w1_b"] = _normal(shapes["hada_w1_b"], 1.0, generator)
        t["hada_w1_a"] = _normal(shapes["hada_w1_a"], 0.1, generator)
        t["hada_w2_b"] = _normal(shapes["hada_w2_b"], 1.0, generator)
        if use_scalar:
            t["hada_w2_a"] = _normal(shapes["hada_w2_a"], 0.1, generator)
            t["scalar"] = torch.zeros((), dtype=torch.float32)
        else:
            t["hada_w2_a"] = torch.zeros(shapes["hada_w2_a"], dtype=torch.float32)
        t["alpha"] = alpha_tensor(alpha)
        return t

    def rank(self, t):
        return int(t["hada_w1_b"].shape[0])

    def _gain(self, t) -> torch.Tensor | float:
        # γ = alpha/rank, applied exactly once (here, and nowhere else). LyCORIS's
        # get_diff_weight/merge applies it a second time (γ², a known bug) while its forward
        # applies it once; we follow the forward, as ComfyUI and A1111 do.
        g = alpha_scale(t, self.rank(t))
        s = t.get("scalar")
        return s * g if s is not None else g

    @staticmethod
    def _halves(t, dtype=None):
        """The four factors, cast to ``dtype`` where they differ (a no-op ``.to`` still costs a call per
        factor per layer on a launch-bound host)."""
        keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if dtype is None:
            return tuple(t[k] for k in keys)
        return tuple(cast(t[k], dtype) for k in keys)

    def _kr_pair(self, t, dtype):
        """``(Ka, Kb)`` in ``dtype``, differentiable: from one batched build per forward pass for all layers of this
        shape where :mod:`.factor_batch` takes the call, else this layer's own (:func:`khatri_rao_pair`)."""
        a1, b1, a2, b2 = self._halves(t)
        if factor_batch.eligible(a1, b1, a2, b2):
            return factor_batch.khatri_rao(a1, b1, a2, b2, dtype, lambda: khatri_rao_pair(*self._halves(t, dtype)))
        return khatri_rao_pair(*self._halves(t, dtype))

    def delta_weight(self, t, spec, weight=None):
        a1, b1, a2, b2 = self._halves(t)
        if "hada_t1" in t:
            dw = rebuild_tucker(t["hada_t1"], a1, b1) * rebuild_tucker(t["hada_t2"], a2, b2)
            dw = dw.reshape(spec.weight_shape)
        else:
            dw = hada_product(a1, b1, a2, b2).reshape(spec.weight_shape)
        return dw * self._gain(t)

    def forward_accumulate(self, acc, x, t, spec, weight, bias, base_out, multiplier, inplace=False):
        """The Khatri–Rao forms with m·γ in the alpha of the up GEMM, which adds into ``acc``."""
        tucker = "hada_t1" in t
        gain = self._gain(t)
        r12 = int(t["hada_w1_b"].shape[0]) * int(t["hada_w2_b"].shape[0])
        if not tucker and not isinstance(gain, torch.Tensor):
            if spec.kind == LINEAR and khatri_rao_pays(spec, r12):
                up, down = self._kr_pair(t, x.dtype)
                return accumulate_linear(acc, F.linear(x, down), up, gain * multiplier, inplace)
            if (spec.kind in CONV_KINDS and spec.groups == 1 and spec.padding_mode == "zeros"
                    and x.dim() == len(spec.kernel) + 2 and khatri_rao_pays(spec, r12)):
                up, down = self._kr_pair(t, x.dtype)
                down = down.reshape((r12, spec.in_dim) + spec.kernel)
                # ∂D by one GEMM where cuDNN's weight gradient is slow, as LoCon's delta path (lora.py): run 248's SD1.5
                # b1 LoHa timeline had 12 cuDNN ``wgrad2d_shmem_tiling`` launches (88 µs each; by their count these
                # convs' — the trace names kernels only); with this call run 249 measured 26.34 ms against 27.09
                h = lowrank.conv_down(x, down, spec)
                return accumulate_conv1x1(acc, h, up, gain * multiplier)
        return super().forward_accumulate(acc, x, t, spec, weight, bias, base_out, multiplier, inplace)

    def lowrank_factors(self, t, spec, dtype):
        """The Khatri–Rao form (a LoRA of rank r1·r2, factors built in ``dtype`` under autograd) where it
        is cheaper than materialising ΔW; Tucker and a trained ``scalar`` keep the other paths."""
        gain = self._gain(t)
        r12 = int(t["hada_w1_b"].shape[0]) * int(t["hada_w2_b"].shape[0])
        if "hada_t1" in t or isinstance(gain, torch.Tensor) or not khatri_rao_pays(spec, r12):
            return None
        up, down = self._kr_pair(t, dtype)
        if spec.kind in CONV_KINDS:
            down = down.reshape((r12, spec.in_dim) + spec.kernel)
        return down, up, gain

    def forward_delta(self, x, t, spec, weight, bias, base_out):
        a1, b1, a2, b2 = self._halves(t, x.dtype)
        tucker = "hada_t1" in t
        r12 = int(b1.shape[0]) * int(b2.shape[0])
        gain = self._gain(t)
        if spec.kind == LINEAR and not tucker and khatri_rao_pays(spec, r12):
            up, down = khatri_rao_pair(a1, b1, a2, b2)
            return F.linear(F.linear(x, down), up) * gain
        if (spec.kind in CONV_KINDS and spec.groups == 1 and spec.padding_mode == "zeros"
                and khatri_rao_pays(spec, r12, tucker)):
            conv = _CONV_FN[spec.kind]
            ones = (1,) * len(spec.kernel)
            if tucker:
                # Hadamard of two Tucker forms = one Tucker form of rank r1·r2: 1×1 down,
                # core (r1·r2, r1·r2, *k) carrying stride/padding/dilation, 1×1 up.
                t1, t2 = t["hada_t1"].to(x.dtype), t["hada_t2"].to(x.dtype)
                core = (t1[:, None, :, None] * t2[None, :, None, :]).reshape((r12, r12) + spec.kernel)
                down = khatri_rao_cols(b1, b2).reshape((r12, spec.in_dim) + ones)
                up = khatri_rao_cols(a1, a2).t().reshape((spec.out_dim, r12) + ones)
                h = conv(x, down)
                h = conv(h, core, None, spec.stride, spec.padding, spec.dilation)
            else:
                up, down = khatri_rao_pair(a1, b1, a2, b2)
                down = down.reshape((r12, spec.in_dim) + spec.kernel)
                up = up.reshape((spec.out_dim, r12) + ones)
                h = conv(x, down, None, spec.stride, spec.padding, spec.dilation)
            return conv(h, up) * gain
        # small layers, large ranks, grouped convs, padding modes: materialise ΔW
        return layer_op(x, spec, self.delta_weight(t, spec).to(x.dtype))

    def export(self, t):
        out = {k: v for k, v in t.items() if k != "scalar"}
        if "scalar" in t:
            out["hada_w1_a"] = t["hada_w1_a"] * t["scalar"]
        return out

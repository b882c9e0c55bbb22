"""LoKr: ΔW = γ · kron(W1, W2), each factor full or low-rank (Yeh et al. 2024, LyCORIS).

Split (``factorization`` from factorize.py; ``in`` means ``in/groups`` for convs):
  ``(out_l, out_k) = fact(out)`` (swapped by ``unbalanced_factorization``), ``(in_m, in_n) = fact(in)``.
  W1 ``(out_l, in_m)``: full ``lokr_w1`` unless ``decompose_both`` and r < max(out_l, in_m)/2 and
  not ``full_matrix``, then ``lokr_w1_a (out_l, r)``, ``lokr_w1_b (r, in_m)``.
  W2 ``(out_k, in_n, *k)``: decomposed iff r < max(out_k, in_n)/2 and not ``full_matrix``:
    linear / non-Tucker conv  ``lokr_w2_a (out_k, r)``, ``lokr_w2_b (r, in_n·∏k)`` (flattened)
    Tucker (k×k conv)         ``lokr_w2_a (r, out_k)``, ``lokr_w2_b (r, in_n)``, ``lokr_t2 (r, r, *k)``
  otherwise full ``lokr_w2 (out_k, in_n, *k)``.
  For convs W1 is unsqueezed to ``(out_l, in_m, 1, …)`` in the kron: the kernel stays in W2.

γ = alpha / r with r the decomposed side's ``_b.shape[0]`` (``lokr_w2_b`` first, else
``lokr_w1_b``), and γ = 1 when both factors are full (the stored alpha is then ignored, even
inf/NaN, as ComfyUI and A1111 do).

Structured forward (never builds ΔW): ``kron(W1, W2)[i·out_k + k, j·in_n + n] = W1[i,j]·W2[k,n]``,
so with x's features viewed as ``X (in_m, in_n)``, ``y = vec(W1 · X · W2ᵀ)``. Grouped convs and
padding modes other than "zeros" materialise ΔW instead.

Low-rank W2 (``W2 = A·B``, the usual ``factor``/``rank`` configuration) is a LoRA: by the mixed-product
rule ``kron(W1, A·B) = kron(W1, A) · kron(I_in_m, B)``, so ``ΔW = U·D`` with ``U = kron(W1, A)``
``(out, in_m·r)``, built from the small factors, and ``D = kron(I, B)`` block-diagonal — applying D is B
on each of the in_m channel groups, i.e. one GEMM (a conv over in_m× the batch) on x viewed
``(…·in_m, in_n)``. The delta path is then ``acc + s·h·Uᵀ`` with ``h = (x grouped)·Bᵀ`` viewed
``(…, in_m·r)``: two GEMMs, as LoRA's, and only the rank-sized h kept (:meth:`LoKr._kron_lora`). Tucker
W2 likewise, with the core conv after the grouped 1×1 down. A full W2 is the same product with ``A = I``:
``kron(W1, W2) = kron(W1, I_out_k) · kron(I_in_m, W2)`` — down W2 itself on the channel groups, up
``kron(W1, I)`` (out × in_m·out_k, as wide as the layer): the bypass op's form on k×k convs with few positions
per weight (:meth:`LoKr._eye_form`, :meth:`LoKr.prefers_op_over_rebuild`), the rebuilt op elsewhere.

Deliberate differences from LyCORIS: γ is applied once everywhere (its merge path applies γ²);
with both factors full and rs_lora its forward scales by √r while loaders use 1: we use 1 and
store alpha = rank (see ``create``); its bypass path is wrong for grouped convs, ours falls back
to the materialised ΔW there.
"""

from __future__ import annotations

import math
import os
from typing import Mapping

import torch
import torch.nn.functional as F

from .base import (
    CONV2D, CONV_KINDS, LINEAR, Algorithm, LayerSpec, Tensors, accumulate_conv1x1, accumulate_linear,
    alpha_scale, alpha_tensor, flat, layer_op, rebuild_tucker, register,
)
from . import factor_batch, factor_triton, lowrank
from ..errors import ConfigError
from .factorize import factorization
from .rebuild import cast, rebuilt_op, supports as rebuild_supports

_CONV_FN = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}

#: Diagnostic switch for the delta path of :meth:`LoKr.forward_accumulate` (``mode = "bypass"``; the
#: benchmark's ``lyco-lokr-dense``/``lyco-lokr-structured`` variants): ``"dense"`` or ``"structured"``
#: forces it for every plain layer (never the LoRA form of a low-rank W2); ``None`` (default) chooses per
#: layer from the shapes. Same values.
FORCE_PATH: str | None = None


def _kaiming(shape, generator=None):
    w = torch.empty(shape, dtype=torch.float32)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=√5) reduces to U(-1/√fan_in, 1/√fan_in)
    w.uniform_(-bound, bound, generator=generator)
    return w


def lokr_shapes(spec: LayerSpec, rank: int, factor: int = -1, decompose_both: bool = False,
                full_matrix: bool = False, unbalanced_factorization: bool = False,
                tucker: bool = False) -> dict[str, tuple[int, ...]]:
    """The tensors (and their shapes) LyCORIS's LokrModule creates for this layer and options."""
    in_m, in_n = factorization(spec.in_dim, factor)
    out_l, out_k = factorization(spec.out_dim, factor)
    if unbalanced_factorization:
        out_l, out_k = out_k, out_l
    k = spec.kernel if spec.is_conv else ()
    shapes: dict[str, tuple[int, ...]] = {}
    if decompose_both and rank < max(out_l, in_m) / 2 and not full_matrix:
        shapes["lokr_w1_a"] = (out_l, rank)
        shapes["lokr_w1_b"] = (rank, in_m)
    else:
        shapes["lokr_w1"] = (out_l, in_m)
    if rank < max(out_k, in_n) / 2 and not full_matrix:
        if tucker and spec.is_kxk_conv:
            shapes["lokr_t2"] = (rank, rank) + k
            shapes["lokr_w2_a"] = (rank, out_k)
            shapes["lokr_w2_b"] = (rank, in_n)
        else:
            shapes["lokr_w2_a"] = (out_k, rank)
            shapes["lokr_w2_b"] = (rank, in_n * (math.prod(k) if k else 1))
    else:
        shapes["lokr_w2"] = (out_k, in_n) + k
    return shapes


def _env_float(var: str, default: float) -> float:
    """A non-negative number from the environment variable ``var`` (``default`` when unset); anything else is an
    error naming the variable."""
    raw = os.environ.get(var)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0.0:
        raise ConfigError(f"{var}={raw!r}: expected a number ≥ 0 (0 turns the rule off; default {default:.4g})")
    return value


#: diagnostic switch (``LYCO_KRON_MERGE=0``: off) for :meth:`_KronBuild._merged_nograd`'s one-pass merge, for A/B runs
_MERGE_KERNEL = os.environ.get("LYCO_KRON_MERGE", "1") != "0"


def kron_linear_grads(x: torch.Tensor, gy: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, s: float,
                      dts: tuple, needs=(True, True)):
    """``(∂W1, ∂W2)`` of a linear layer ``y = x·Wᵀ + s·x·kron(W1, W2)ᵀ`` straight from ∂y and x — never the
    out × in ``∂W′ = ∂yᵀ·x``. ``x`` ``(R, in_m·in_n)`` and ``gy`` ``(R, out_l·out_k)`` rows in one dtype (the
    products' and intermediates'), ``w1`` ``(out_l, in_m)``, ``w2`` ``(out_k, in_n)`` (cast to it), ``dts`` the
    dtypes to write the two gradients in; ``needs`` which to form (None for the other).

    With the rows viewed ``X (R, in_m, in_n)`` and ``∂Y (R, out_l, out_k)``:
    ``∂W1[l,m] = s·Σ_{r,k,n} ∂Y[r,l,k]·W2[k,n]·X[r,m,n]`` and ``∂W2[k,n] = s·Σ_{r,l,m} ∂Y[r,l,k]·W1[l,m]·X[r,m,n]``.
    Each contracts one factor into one operand first; of the two orders this takes the one whose intermediates are
    smaller — ``R·in_m·out_k`` elements (``T = X·W2ᵀ``, ``G = W1ᵀ·∂Y`` per row) or ``R·out_l·in_n`` (``Z = ∂Y·W2``,
    ``H = W1·X`` per row): for a layer that widens (SD's ``ff.net.0``, 1280 → 10240 at factor 8) the second, 8× less.
    The per-row products with W1 are one batched GEMM with W1 broadcast (batch stride 0); then ∂W1 is a batched GEMM
    over the rows (an ``out_l × in_m`` product per row, summed in fp32) and ∂W2 one GEMM over ``R·in_m`` (or
    ``R·out_l``) rows. Multiply-adds ``2·R·in·out_k`` (or ``2·R·out·in_n``) against the
    weight gradient's ``R·in·out``: at factor 8, a quarter.

    Numerics: the intermediate is rounded once to the rows' dtype (bf16: 2⁻⁹ relative per element) — as ∂W′ is
    when the rebuilt op writes it; the per-row ``out_l × in_m`` products of ∂W1 likewise before their fp32 sum."""
    r = x.shape[0]
    L, M = w1.shape
    K, N = w2.shape
    cd = gy.dtype
    x3 = cast(x, cd).reshape(r, M, N)  # a copy only for rows of other strides (an expanded ∂y: a sum's)
    gy3 = gy.reshape(r, L, K)
    w1c, w2c = cast(w1, cd), cast(w2, cd)
    g1 = g2 = None
    if M * K <= L * N:
        if needs[0]:
            t = (x3.reshape(r * M, N) @ w2c.t()).view(r, M, K)
            g1 = lowrank._bmm_sum(gy3, t.transpose(1, 2), s, dts[0])
            del t
        if needs[1]:
            g = torch.bmm(w1c.t().expand(r, M, L), gy3)                          # (R, M, K)
            g2 = lowrank._mm(g.view(r * M, K).t(), x3.reshape(r * M, N), s, dts[1])
    else:
        if needs[0]:
            z = (gy3.reshape(r * L, K) @ w2c).view(r, L, N)
            g1 = lowrank._bmm_sum(z, x3.transpose(1, 2), s, dts[0])
            del z
        if needs[1]:
            h = torch.bmm(w1c.expand(r, L, M), x3)                               # (R, L, N)
            g2 = lowrank._mm(gy3.reshape(r * L, K).t(), h.view(r * L, N), s, dts[1])
    return (None if g1 is None else cast(g1, dts[0]), None if g2 is None else cast(g2, dts[1]))


class _KronBuild:
    """LoKr for :mod:`.rebuild`: ``W′ = W + s·kron(W1, W2)`` with θ = (W1, W2 flat) formed outside the op
    (under autograd: they are the small factors, ``a @ b`` or a Tucker rebuild at most).

    The weight is viewed as ``(out_l, out_k, in_m, c2)`` (c2 = in_n·∏k: the flattened conv layout, see
    :meth:`LoKr.delta_weight`), where ``kron(W1, W2)[i,k,j,l] = W1[i,j]·W2[k,l]``, so the merge is one
    broadcast ``addcmul`` (the add and the scale fused, rounded once), and with ``E = ∂W′``:
    ``∂W1[i,j] = s·Σ_kl E[i,k,j,l]·W2[k,l]`` and ``∂W2[k,l] = s·Σ_ij E[i,k,j,l]·W1[i,j]`` — each one batched
    matrix-vector product reading E once in place (no permuted copy) and a small sum.

    Autograd through ``torch.kron`` (the generic rebuilt op) did the same with broadcast multiplies and
    reductions over weight-sized tensors: on an H200 at SD1.5 b8, ≈ 1000 elementwise kernels per step
    taking 13.6 ms plus 7 ms of reductions (``results/run12_h200_profile/``).

    Where :mod:`.factor_triton`'s kernels are taken (CUDA bf16/fp16, captured steps by default) the merge and the
    two reductions are one Triton pass each (:func:`.factor_triton.kron_merge`, :func:`.factor_triton.kron_weight_grads`:
    fp32 sums, rounded once): the batched matrix-vector products took 121 + 43 µs and torch's ``addcmul`` 54 µs per
    merge on a 14.7 M-element weight (run 148's profile, SD1.5's 8×8 conv) — the merge at about a third of the
    memory bandwidth, the products at less than a tenth. SD1.5 b8 ``lokr-full`` as one graph (H100): the reductions' kernel 93.77 → 88.55 ms (run 149, A/B
    against ``LYCO_FACTOR_KERNELS=0``), the merge's 88.08 → 86.40 / 86.46 (run 150, A/B/A against
    ``LYCO_KRON_MERGE=0``)."""

    bias_grad = False
    #: its ∂W′ and this backward on the side stream beside ∂x in captured steps (:func:`.rebuild._side_wanted`)
    side_backward = True
    #: :meth:`vjp` reads only ∂W′ and θ, not what :meth:`recompute` returns (:func:`.rebuild._early_fork`)
    vjp_reads_aux = False
    #: c of :meth:`direct_ok` (``LYCO_LOKR_DIRECT_ROWS``; 0: never) and the fewest weight elements it takes
    #: (``LYCO_LOKR_DIRECT_MIN``) — the rule and its defaults from run 330's per-shape table (change 177)
    DIRECT_ROWS = _env_float("LYCO_LOKR_DIRECT_ROWS", 4.0)
    DIRECT_MIN = _env_float("LYCO_LOKR_DIRECT_MIN", float(1 << 23))

    def __init__(self, s: float):
        self.s = s

    @staticmethod
    def factors(w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """θ in the broadcast shapes the merge and the backward use — W1 as ``(out_l, 1, in_m, 1)``, W2 as
        ``(1, out_k, 1, c2)`` — so neither reshapes per call (each reshape is a host call per layer)."""
        return w1.view(w1.shape[0], 1, w1.shape[1], 1), w2.view(1, w2.shape[0], 1, w2.shape[1])

    @staticmethod
    def _as4(w, t1, t2):
        """``w`` (the base weight, or ∂W′) as ``(out_l, out_k, in_m, c2)`` — a view of a contiguous tensor, else
        a contiguous copy: a channels-last conv weight (a model put in ``torch.channels_last``, as diffusers'
        docs suggest for speed, or a frozen weight kept that way) has its input channels innermost, so the
        NCHW-flattened c2 is no view of it (session 37: every LoKr conv on the rebuilt op raised there). The
        merge then returns W′ contiguous, which every consumer takes."""
        shape = (t1.shape[0], t2.shape[1], t1.shape[2], t2.shape[3])
        return w.view(shape) if w.is_contiguous() else w.reshape(shape)

    def merged(self, w, t1, t2):
        out = torch.addcmul(self._as4(w, t1, t2), cast(t1, w.dtype), cast(t2, w.dtype), value=self.s)
        return out.view(w.shape)

    def __call__(self, w, b, t1, t2):  # differentiable (a trainable base weight)
        return self.merged(w, t1, t2), b

    def _merged_nograd(self, w, t1, t2):
        """:meth:`merged` outside autograd (the op's forward and backward): one Triton pass where the factor kernels
        are taken (:func:`.factor_triton.kron_merge`, fp32 from the factors as stored, rounded once), else the
        ``addcmul`` of the factors cast to W's dtype."""
        if _MERGE_KERNEL and factor_triton.kron_merge_ok(w):
            w4 = factor_triton.kron_merge(self._as4(w, t1, t2), t1.view(t1.shape[0], t1.shape[2]),
                                          t2.view(t2.shape[1], t2.shape[3]), self.s)
            return w4.view(w.shape)
        return self.merged(w, t1, t2)

    def forward_aux(self, w, b, t1, t2):
        return self._merged_nograd(w, t1, t2), b, ()

    def recompute(self, keep, w, b, t1, t2):
        return self._merged_nograd(w, t1, t2), None

    def direct_ok(self, spec: LayerSpec, x: torch.Tensor) -> bool:
        """Whether the factors' gradients come straight from ∂y and x (:meth:`direct_grads`, asked by
        :class:`.rebuild._RebuiltOp`'s backward) instead of from ``∂W′``: a linear layer of at least
        :data:`DIRECT_MIN` weight elements whose rows (x's, 2-D here) are at most :data:`DIRECT_ROWS` times its
        harmonic width ``out·in / (out + in)``.

        Why (run 328, H200, SDXL b1 ``lokr-full``: 103.6 ms against the floor's 58.2): by inference from the
        kernels' names and counts (the trace has no shapes), the weight gradients ∂W′ at 1024 rows are GEMMs with a
        short k-loop and a weight-sized output — ``448x64`` tiles 361× at 29 µs a call, the 1280-level GEGLU
        projections' 60× at 140 µs — and their two reductions (``_kron_wgrad_kernel`` and its finish, 735× each):
        ≈ 22.7 + 10.8 ms on the critical path of the step's ≈ 45 over the floor. :func:`kron_linear_grads` does a
        quarter of the multiply-adds at factor 8 and writes nothing weight-sized; it reads x and ∂y twice and writes
        an activation-sized intermediate twice, which is why many rows (SD1.5 b8: 32768 at 320 channels) may not
        pay.

        Measured (H200; ``benchmarks/experiments/kron_direct_shapes.py``, run 330, each form alone in a CUDA graph,
        factor 8): the direct form won on one shape family only, the 1280 → 10240 GEGLU projection — 0.42–0.68 of
        the ∂W′ path's time at 64–4096 rows (SDXL b1: 57 against 85 µs, 60 layers) —, tied on 5120 → 1280 at SD1.5
        b1 and SDXL b4 (0.92–0.99) but lost there at SD1.5 b8 and SDXL b1 (1.15–1.27), and lost everywhere else,
        1.3–12× (the square attention projections at every row count — by inference, not profiled, their per-row
        ``out_l × in_m`` products and narrow GEMMs; 640 → 5120 by 1.6–1.8×, though it widens as much). In the
        step with every linear layer on it, it lost: SDXL b1 87.38 → 102.10 ms, SD1.5 b1 24.98 → 32.15, b8
        80.04 → 124.15 (runs 329–330). Hence the weight-size floor (2²³ elements: the 13.1 M-element projection in,
        the 6.6 M-element ``ff.net.2`` out) and c = 4 (4096 rows at SDXL b4 are 3.6 of its harmonic width). A rule
        fitted to the shapes measured, not derived: the one shape that pays is also the largest ∂W′ of the UNets."""
        if spec.kind != LINEAR or self.DIRECT_ROWS <= 0.0:
            return False
        out, inp = spec.out_dim, spec.flat_in
        return out * inp >= self.DIRECT_MIN and x.shape[0] <= self.DIRECT_ROWS * out * inp / (out + inp)

    def direct_grads(self, x, gy, theta, needs):
        """θ's gradients by :func:`kron_linear_grads` (``x``, ``gy``: the op's rows), in θ's shapes and dtypes.

        A permuted form (x and ∂y permuted once, every product one plain GEMM; NOTES change 180) lost here: lokr-full
        SDXL b1 85.60 ms on the layers :meth:`direct_ok` takes and 103.01 on every linear layer, against 83.15 (run
        334, H200); alone it was the fastest form on no shape. It was taken out of the library and lives on in
        ``benchmarks/experiments/kron_direct_shapes.py``."""
        t1, t2 = theta
        g1, g2 = kron_linear_grads(x, gy, t1.view(t1.shape[0], t1.shape[2]), t2.view(t2.shape[1], t2.shape[3]),
                                   self.s, (t1.dtype, t2.dtype), needs)
        return (g1.view(t1.shape) if g1 is not None else None, g2.view(t2.shape) if g2 is not None else None)

    def vjp(self, aux, theta, gw, gb, needs):
        t1, t2 = theta
        e4 = self._as4(gw, t1, t2)
        if any(needs) and e4.is_contiguous() and factor_triton.usable(gw, 0):
            # one Triton pass over E for both, one for their fp32 sums scaled and rounded to the factors' dtypes
            # (factor_triton.kron_weight_grads)
            g1, g2 = factor_triton.kron_weight_grads(e4, t1.view(t1.shape[0], t1.shape[2]),
                                                     t2.view(t2.shape[1], t2.shape[3]), self.s, (t1.dtype, t2.dtype))
            return (g1.view(t1.shape) if needs[0] else None, g2.view(t2.shape) if needs[1] else None)
        g1 = g2 = None
        if needs[0]:  # Σ_l E[i,k,j,l]·W2[k,l] for every (i,k,j), then Σ_k → (out_l, 1, in_m, 1)
            g1 = torch.matmul(e4, cast(t2, gw.dtype).transpose(2, 3)).sum(1, keepdim=True)
            g1 = cast(g1 * self.s if self.s != 1.0 else g1, t1.dtype)
        if needs[1]:  # Σ_j W1[i,j]·E[i,k,j,l] for every (i,k,l), then Σ_i → (1, out_k, 1, c2)
            g2 = torch.matmul(cast(t1, gw.dtype).transpose(2, 3), e4).sum(0, keepdim=True)
            g2 = cast(g2 * self.s if self.s != 1.0 else g2, t2.dtype)
        return g1, g2


@register
class LoKr(Algorithm):
    name = "lokr"
    keys = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                      "lokr_t2", "alpha", "scalar"})
    detect_keys = ()  # detect() is overridden: lokr_w1 *or* lokr_w1_a
    options = {"factor": -1, "decompose_both": False, "full_matrix": False,
               "unbalanced_factorization": False, "use_tucker": False, "use_scalar": False,
               "rs_lora": False}
    supports_dora = True
    bypass_grouped = True

    @classmethod
    def detect(cls, keys, tensors=None) -> bool:
        return "lokr_w1" in keys or "lokr_w1_a" in keys

    def create(self, spec, opts, weight=None, generator=None) -> Tensors:
        r = int(opts["rank"])
        shapes = lokr_shapes(spec, r, int(opts.get("factor", -1)), bool(opts.get("decompose_both")),
                             bool(opts.get("full_matrix")), bool(opts.get("unbalanced_factorization")),
                             bool(opts.get("use_tucker")))
        full_full = "lokr_w1" in shapes and "lokr_w2" in shapes
        alpha = opts.get("alpha")
        alpha = float(r if alpha in (None, 0) else alpha)
        if full_full:
            # Both factors full: γ is 1 and every reader ignores the stored alpha. We store the
            # configured rank, a finite number. (LyCORIS stores rank·rank/r_factor, which for
            # rs_lora is r·√r, and then its own forward scales by √r: we keep γ = 1, the loaders'
            # reading, with or without rs_lora.)
            alpha = float(r)
        elif opts.get("rs_lora"):
            alpha = alpha * math.sqrt(r)  # stored so that alpha/r == α/√r
        use_scalar = bool(opts.get("use_scalar"))
        t: Tensors = {}
        # LyCORIS's LokrModule draws in this order; keeping it makes a seeded global RNG give
        # the same tensors as LyCORIS.
        if "lokr_w2" in shapes:
            t["lokr_w2"] = (_kaiming(shapes["lokr_w2"], generator) if use_scalar
                            else torch.zeros(shapes["lokr_w2"], dtype=torch.float32))
        else:
            if "lokr_t2" in shapes:
                t["lokr_t2"] = _kaiming(shapes["lokr_t2"], generator)
            t["lokr_w2_a"] = _kaiming(shapes["lokr_w2_a"], generator)
            t["lokr_w2_b"] = (_kaiming(shapes["lokr_w2_b"], generator) if use_scalar
                              else torch.zeros(shapes["lokr_w2_b"], dtype=torch.float32))
        if "lokr_w1" in shapes:
            t["lokr_w1"] = _kaiming(shapes["lokr_w1"], generator)
        else:
            t["lokr_w1_a"] = _kaiming(shapes["lokr_w1_a"], generator)
            t["lokr_w1_b"] = _kaiming(shapes["lokr_w1_b"], generator)
        if use_scalar:
            t["scalar"] = torch.zeros((), dtype=torch.float32)
        t["alpha"] = alpha_tensor(alpha)
        return t

    def rank(self, t):
        for k in ("lokr_w2_b", "lokr_w1_b"):
            if k in t:
                return int(t[k].shape[0])
        return None  # both factors full

    def scale(self, t):
        r = self.rank(t)
        # Both factors full: γ = 1 whatever alpha says (ComfyUI/A1111 do the same).
        return 1.0 if r is None else alpha_scale(t, r)

    def _gain(self, t) -> torch.Tensor | float:
        # γ applied exactly once (LyCORIS's get_diff_weight/merge applies it twice: a known bug).
        g = self.scale(t)
        s = t.get("scalar")
        return s * g if s is not None else g

    @staticmethod
    def _w1(t: Mapping[str, torch.Tensor], dtype=None) -> torch.Tensor:
        if "lokr_w1" in t:
            w1 = t["lokr_w1"]
            return w1.to(dtype) if dtype is not None else w1
        a, b = t["lokr_w1_a"], t["lokr_w1_b"]
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        return a @ b

    @staticmethod
    def _in_m(t: Mapping[str, torch.Tensor]) -> int:
        """in_m: W1's columns (full ``lokr_w1`` or its ``_b`` half)."""
        return int((t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_b"]).shape[-1])

    @staticmethod
    def _w2_flat(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """W2 as 2-D ``(out_k, in_n·∏k)``, row-major (the flattened conv layout)."""
        if "lokr_w2" in t:
            return flat(t["lokr_w2"])
        a, b = t["lokr_w2_a"], t["lokr_w2_b"]
        if "lokr_t2" in t:
            return flat(rebuild_tucker(t["lokr_t2"], a, b))
        return a @ flat(b)

    def delta_weight(self, t, spec, weight=None):
        w1 = self._w1(t)
        # kron(W1, W2 flattened) reshaped == kron(W1[..., None, None], W2 4-D): the flattened
        # column index j·(in_n·∏k) + n·∏k + s is exactly (j·in_n + n)·∏k + s.
        dw = torch.kron(w1, self._w2_flat(t)).reshape(spec.weight_shape)
        return dw * self._gain(t)

    @staticmethod
    def _kron_lora_pays(t, spec) -> bool:
        """Whether this layer runs as the LoRA of the module doc (``_kron_lora``): W2 low-rank, no trained
        ``scalar``, a linear or ungrouped zero-padded conv layer, and its multiply-adds per output position
        (down ``r·in·∏k``, up ``out·in_m·r``) below the layer's own (``out·in·∏k``: what a materialised ΔW
        or the rebuilt op's weight gradient costs)."""
        if "lokr_w2_b" not in t or "scalar" in t:
            return False
        if not (spec.kind == LINEAR or (spec.kind in CONV_KINDS and spec.groups == 1
                                        and spec.padding_mode == "zeros" and not isinstance(spec.padding, str))):
            return False
        r = int(t["lokr_w2_b"].shape[0])
        in_m = LoKr._in_m(t)
        ksz = math.prod(spec.kernel) if spec.is_conv else 1
        return r * (spec.in_dim * ksz + spec.out_dim * in_m) < spec.out_dim * spec.flat_in

    def _kron_up(self, t, dt) -> torch.Tensor:
        """``U = kron(W1, A)`` ``(out, in_m·r)`` in ``dt``, differentiable in the factors: from one batched build
        per forward pass for all layers of this shape where :mod:`.factor_batch` takes the call (trainable full
        W1, non-Tucker A), else this layer's own (:meth:`_kron_up_own`)."""
        if "lokr_w1" in t and "lokr_t2" not in t:
            w1, a = t["lokr_w1"], t["lokr_w2_a"]
            if factor_batch.eligible(w1, a):
                return factor_batch.kron_up(w1, a, dt, lambda: self._kron_up_own(t, dt))
        return self._kron_up_own(t, dt)

    def _kron_up_own(self, t, dt) -> torch.Tensor:
        """This layer's own ``U = kron(W1, A)`` in ``dt``."""
        w1 = self._w1(t, dt)
        a = cast(t["lokr_w2_a"], dt)
        out_l, in_m = w1.shape
        if "lokr_t2" in t:  # stored (r, out_k): A is its transpose
            a = a.t()
        out_k, r = a.shape
        # U[(i,k),(j,ρ)] = W1[i,j]·A[k,ρ]: on CUDA bf16/fp16 one Triton launch forward and one backward
        # (factor_triton.kron_up); else one broadcast multiply (views, not indexing: each Python-level index is
        # a host call per layer; the last reshape copies only for Tucker's transposed A, whose layout the
        # multiply keeps), which autograd differentiates with two multiplies and two reductions over U-sized
        # tensors
        if factor_triton.usable(a, factor_triton.kron_inner(in_m, r)):
            return factor_triton.kron_up(w1, a)
        return torch.mul(w1.reshape(out_l, 1, in_m, 1), a.reshape(1, out_k, 1, r)).reshape(out_l * out_k, in_m * r)

    def bypass_factors(self, t, spec, dtype):
        """On a linear layer or 2-D conv where the LoRA form pays (no Tucker core, no trained ``scalar``): ``(B as
        an (r, in_n[, *k]) matrix or kernel, kron(W1, A), γ, in_m)``, i.e. ``ΔW = γ·kron(W1, A)·kron(I, B)`` — the
        bypass op applies B to each of x's in_m channel groups, as :meth:`_grouped_down` does, and never forms
        ``kron(I, B)``: its merged weight is one GEMM over W's rows split into in_m blocks, ∂B one GEMM over the
        groups folded into the rows. History: linear layers first took a dense ``kron(I, B)`` (an identity, the
        Kronecker product and its backward per layer and step, an h GEMM at in_m× the multiply-adds; run 68:
        95.47 → 94.35 ms); the grouped conv variant measured no gain in run 70 (94.41 vs 94.33 ms) and was
        reverted — but every conv through the op then copied all of ∂y in its ∂h (``torch.matmul`` folding a 2-D
        Uᵀ, found in run 71); back in run 73: 93.41 → 91.66 ms. LoKr's rebuild path is its own
        (:meth:`rebuild_op`); a full W2's op is :meth:`bypass_op`'s."""
        if (spec.kind not in (LINEAR, CONV2D) or "lokr_t2" in t or not self._kron_lora_pays(t, spec)
                or isinstance(self._gain(t), torch.Tensor)):
            return None
        # B as it is: the op casts its factors itself (in a training step from the storage's one cast,
        # casts.cast_factor) — a cast here went through autograd, one kernel forward and one backward per layer
        b = t["lokr_w2_b"]
        down = b if spec.kind == LINEAR else b.reshape(b.shape[0], -1, *spec.kernel)
        return down, self._kron_up(t, dtype), self._gain(t), LoKr._in_m(t)

    @staticmethod
    def _eye_form(t, spec) -> bool:
        """Whether a *full* W2 on this layer has the op's LoRA form ``kron(W1, W2) = kron(W1, I)·kron(I, W2)``: the
        down W2 itself (``r = out_k``, a conv over in_m× the batch), the up ``kron(W1, I_out_k)`` (out ×
        in_m·out_k: for a k×k conv 1/∏k of the layer's multiply-adds where in_m = out_l; built inside the op,
        :meth:`bypass_op`). Only 2-D k×k convs (zero padding, ungrouped, no trained ``scalar``): on a linear layer
        that up costs as much as the layer itself, three times per step — the rebuilt op's one weight-gradient
        GEMM is cheaper."""
        return ("lokr_w2" in t and "scalar" not in t and spec.kind == CONV2D and spec.groups == 1
                and spec.kernel_numel > 1 and spec.padding_mode == "zeros" and not isinstance(spec.padding, str))

    def bypass_op(self, x, t, spec, weight, bias, multiplier):
        """A full W2 on a k×k conv (:meth:`_eye_form`): the bypass op with ``eye = out_k`` — down W2 on the in_m
        channel groups, up ``kron(W1, I)`` built inside the op from W1, whose gradient the op returns directly
        (``Σ_k ∂U[(i,k),(j,k)]`` as one batched GEMM over ∂y and h, never the out × in_m·out_k ∂U:
        :func:`.lowrank._grad_up`). Else the default (:meth:`bypass_factors`)."""
        gain = self._gain(t)
        if self._eye_form(t, spec) and not isinstance(gain, torch.Tensor):
            w2 = t["lokr_w2"]
            return lowrank.bypass_op(x, spec, weight, bias, w2, self._w1(t), float(gain) * multiplier,
                                     LoKr._in_m(t), eye=int(w2.shape[0]))
        return super().bypass_op(x, t, spec, weight, bias, multiplier)

    def _kron_lora(self, acc, x, t, spec, s, inplace):
        """``acc + s·(B applied per channel group)·kron(W1, A)ᵀ`` (module doc), or None where x's layout
        does not allow the grouped view (unbatched conv input). ``s`` a Python number."""
        dt = x.dtype
        b = cast(t["lokr_w2_b"], dt)
        r = b.shape[0]
        in_m = LoKr._in_m(t)
        up = self._kron_up(t, dt)
        if spec.kind == LINEAR:
            in_n = x.shape[-1] // in_m
            h = F.linear(x.reshape(-1, in_n), b).view(*x.shape[:-1], in_m * r)
            return accumulate_linear(acc, h, up, s, inplace)
        if x.dim() != len(spec.kernel) + 2:
            return None
        h = self._grouped_down(x, t, spec, in_m, dt)      # (N·in_m, r, *sp')
        h = h.reshape(x.shape[0], in_m * r, *h.shape[2:])
        return accumulate_conv1x1(acc, h, up, s)

    @staticmethod
    def _grouped_down(x, t, spec, in_m, dt):
        """A low-rank W2's down half on a batched conv input: B (after it the Tucker core, which carries
        the layer's stride/padding/dilation; else B does) applied to each of the in_m channel groups,
        folded into the batch — ``(N·in_m, r, *sp')``."""
        conv = _CONV_FN[spec.kind]
        b = cast(t["lokr_w2_b"], dt)
        r, nk = b.shape[0], len(spec.kernel)
        xg = x.reshape(x.shape[0] * in_m, x.shape[1] // in_m, *x.shape[2:])  # a view for channels-first x
        kw = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation)
        if "lokr_t2" in t:
            return conv(conv(xg, b.reshape(r, -1, *(1,) * nk)), cast(t["lokr_t2"], dt), None, **kw)
        # ∂B by one Triton launch where it runs (lowrank.conv_down without its shifted copies, whose rule reads the
        # layer's channels, not a group's): cuDNN's grouped-batch weight gradient ran wgrad2d_grouped_direct_kernel,
        # 50 µs, on SD1.5 b1's 16×16 640-wide delta-path conv (runs 279–280)
        return lowrank.conv_down(xg, b.reshape(r, -1, *spec.kernel), spec, im2col=False)

    def prefers_rebuild_for(self, t, spec):
        """``mode = "auto"``: the rebuilt op with :class:`_KronBuild` wherever it runs (linear and
        zero-padded conv layers). Decision from GPU run 13 (H200, SD1.5 b8, lin+conv, factor 8; two
        rounds, ``results/run13_h200_lokr/``): device time as one CUDA graph 98.4 vs 105.3 ms on the delta
        path (PEFT 129.0), peak 8.85 vs 9.49 GiB (PEFT 10.38), eager 162/178 vs 177/220 ms; full-matrix
        96.3 vs 105.2 ms, 8.88 vs 9.52 GiB. The delta path's dense ΔW costs a second full-size GEMM
        forward and two backward, its structured form batched tiny GEMMs; the rebuild costs one
        weight-gradient GEMM. Numerics as every rebuild (``rebuild.py``): W′ rounded once to the model's
        dtype; the factors' gradients exact functions of ∂y and x.

        Low-rank W2 (where :meth:`_kron_lora_pays`) takes the delta path instead, as the LoRA of the module
        doc — no weight-gradient GEMM (on the 3×3 convs the largest one), no weight-sized build. Decision
        from GPU run 27 (H100, SD1.5 b8, rank 16 factor 8 on lin+conv: every layer's W2 low-rank; two
        rounds, ``results/run27_h100_lokr_lowrank/``): one-graph device time 100.7 / 100.7 ms vs 104.3 /
        104.3 on the rebuilt op (PEFT 135.9: 0.74×); eager 186.1 / 187.1 vs 284.1 / 201.7 (PEFT 318.3 /
        219.0); peak 9.51 vs 8.85 GiB (PEFT 10.38) — h ``(…, in_m·r)`` kept per layer. Full W2 stays on
        the rebuilt op (its structured form needs an output-sized intermediate) — except, in steps that take the
        bypass op, on k×k convs with few positions per weight (:meth:`prefers_op_over_rebuild`). In those steps,
        narrow layers with a low-rank W2 take the rebuilt op instead (:meth:`prefers_rebuild_in_op`)."""
        return rebuild_supports(spec) and not self._kron_lora_pays(t, spec)

    def prefers_rebuild_in_op(self, t, spec, x=None):
        """Where the bypass op runs (``mode = "auto"``): the rebuilt op instead on a *narrow* layer with a
        low-rank W2 (:meth:`_weight_grad_pays`) — its one weight-gradient GEMM costs less than the passes over
        the activations the LoRA form's h needs — whose input ``x`` (where given) has at least ``REBUILD_MIN_ROWS``
        rows (:meth:`_rows_pay`). Only there — steps captured as CUDA graphs by default
        (``LYCO_BYPASS_OP``, :mod:`.graph_policy`), as the op itself: eager steps are bound by the host (a Python
        backward per layer costs there what it saves on the device). With this choice in every step, eager SD1.5
        b8 LoKr steps measured 241–292 ms against 167–189 without it (runs 85 and 87) — but one later run
        (89) measured 183–235 ms for identical eager code, so that eager cost is not established; the graph
        gain is (87.3–87.6 vs 89.2–89.6 ms, runs 85/87/89)."""
        return ("lokr_w2_b" in t and rebuild_supports(spec) and self._weight_grad_pays(t, spec)
                and (x is None or self._rows_pay(x, spec)))

    #: the fewest input rows (positions × batch) at which :meth:`prefers_rebuild_in_op` rebuilds a narrow layer;
    #: ``LYCO_LOKR_REBUILD_ROWS`` overrides it (0: no row limit — the width rule alone, as before session 35)
    REBUILD_MIN_ROWS = _env_float("LYCO_LOKR_REBUILD_ROWS", 16384.0)

    @staticmethod
    def _rows_pay(x, spec) -> bool:
        """Whether the input's rows (``x.numel() / in``: the batch times the positions, for linear and conv inputs
        alike) reach ``REBUILD_MIN_ROWS``. Why: the width rule (:meth:`_weight_grad_pays`) compares costs that both
        scale with the rows — measured at SD1.5 b8 — but the rebuilt op also pays passes that do not: the merge,
        once forward and once backward, and ∂W′ written and read by the factor reduction, each weight-sized, plus
        four launches per layer. With few rows those dominate. H100, SD1.5 b1 LoKr f8 as one graph (run 255,
        ``results/run255_h100_lokr_rule35/``): the width rule at 340 (111 layers rebuilt) **28.71 / 28.72 ms**, at
        256 (harmonic widths ≤ 256 only: the 320-channel linear layers and 1×1 convs, ff.out 1280 → 320 and the
        cross-attention k/v 768 → 320) 28.25, off **27.76** (graph peak 2.677 → 2.758 GiB, PEFT's 4.08) — so by the
        step's time (not measured per layer) at 4096 rows (SD1.5 b1's 64×64 level) even those run faster in the LoRA
        form, where at 32768 (b8) the 320² ones ran 113.5 against 162.8 µs rebuilt (runs 83–84). 16384 keeps SD1.5
        b8's 64×64 level (32768 rows) rebuilt and moves its 32×32 level (8192; measured ties there at b8) and the
        cross-attention k/v (the text's 77 rows per sample) to the LoRA form: SD1.5 b8 79.63 against 79.94 ms without
        the row limit (run 256)."""
        return x.numel() >= LoKr.REBUILD_MIN_ROWS * spec.in_dim

    op_over_rebuild = True

    #: break-even of :meth:`prefers_op_over_rebuild`: a full W2's LoRA form on a k×k conv while the positions are at
    #: most this many times the layer's ``in·∏k`` (runs 149 and 152: 0.75 against 4 and 0.4);
    #: ``LYCO_LOKR_EYE_POSITIONS`` overrides it (0: never — a diagnostic switch for A/B runs)
    EYE_POSITIONS = _env_float("LYCO_LOKR_EYE_POSITIONS", 0.75)

    def prefers_op_over_rebuild(self, t, spec, x):
        """A full W2 on a k×k conv (:meth:`_eye_form`) where the input has few positions per weight
        (``positions ≤ EYE_POSITIONS·in·∏k``): the rebuilt op's costs there are weight-sized (the merged weight twice,
        ∂W′ with its layout conversion and its two reductions: passes over out·in·∏k elements that do not shrink
        with the positions), the LoRA form's activation-sized. Only in the steps that take the op (the layer host
        asks where ``mode = "auto"`` rebuilds, :mod:`.graph_policy`'s captured steps by default); eager steps keep
        the rebuilt op.

        Measured (H100, SD1.5 b8 ``lokr-full``: factor 8, both factors full on every lin+conv layer). Per layer
        (run 149, ``results/run149_h100_lokr_eye2/``, each 3×3 conv alone as a CUDA graph, before the rebuilt op's
        Triton kernels): at 8×8, 1280 → 1280, the rebuilt op 651 µs against 378 on this form; 2560 → 1280 1066
        against 635; at 32×32, 1280 → 1280 (positions 0.71·in·∏k) 1635 against 1367; 640 → 640 (1.42) 500 against
        509; 960 → 640 (0.95) 703 against 1147; at 64×64 (3.8–11.4) the rebuilt op by 15–40 %. The step as one graph:
        run 148 (rule at 4, no kernels) 93.6 against 101.75 ms without it; run 149 0.75 against 4: 87.86 against
        88.55; run 152, with the rebuilt op's kernels: **86.38 / 86.52** against 89.50 without the rule and 86.81 at
        0.4 (floor 67.08: 1.29×); run 153, with ∂W1 straight from ∂y and h (:meth:`bypass_op`): 84.66 / 84.71
        against 86.48 (1.26×). SDXL b4 (run 151): 239.74 against 239.58 without it — neutral there."""
        if not self._eye_form(t, spec) or isinstance(self._gain(t), torch.Tensor):
            return False
        positions = x.shape[0] * x.shape[2] * x.shape[3]
        return positions <= LoKr.EYE_POSITIONS * spec.flat_in

    #: break-even of :meth:`_weight_grad_pays` per channel of LoKr's h (``in_m·r``): 340 at the benchmark's
    #: 128-channel h (runs 83–84); ``LYCO_LOKR_WGRAD_PER_H`` overrides it (0: the rule off — a diagnostic
    #: switch for A/B runs)
    WGRAD_PER_H = _env_float("LYCO_LOKR_WGRAD_PER_H", 340.0 / 128.0)

    @staticmethod
    def _weight_grad_pays(t, spec) -> bool:
        """Whether the rebuilt op beats the LoRA form (the bypass op or the delta path) on this layer: the
        "harmonic width" ``out·in·∏k / (out + in·∏k)`` at most ``WGRAD_PER_H · in_m·r``.

        Why: per output position the rebuilt op pays one weight-gradient GEMM (``out·in·∏k`` multiply-adds,
        the forward's count) and reads x and ∂y once there; the LoRA form pays no weight-sized GEMM but
        reads x twice (h, ∂B) and ∂y twice (∂U, ∂h), writes and reads the ``in_m·r``-wide h and ∂h, and runs
        its grouped GEMMs (K = in_n, N = r: tensor-core tiles mostly empty) — costs that grow with
        ``in + out`` and with h's width. Both scale with the positions, so the break-even is a width,
        independent of batch and resolution. Measured (GPU runs 83–84, H100, SD1.5 b8 bf16, rank 16 /
        factor 8: h 128 channels wide on every layer; each layer alone, forward + backward as a CUDA graph,
        ``results/run83_h100_rebuild_convs``, ``run84_h100_rebuild_lin``): the rebuilt op against the
        bypass op at 64×64 — q/k/v/out 320→320 113.5 vs 162.8 µs, GEGLU 320→2560 344 vs 509, ff.out
        1280→320 217 vs 273, proj 1×1 convs 129 vs 173, 3×3 convs 320→320 543 vs 660 and 640→320 856 vs
        934 (harmonic widths 160–303); 640-wide layers at 32×32 (harmonic 320) within 2 %; from 349 on
        (768→640, 3×3 640→640 at 576: 455 vs 514 µs, every 1280-wide layer: up to 2× slower) the LoRA
        form wins. The threshold scales with h's width (narrower h, cheaper LoRA form) — measured only at
        128 channels.

        Numerics: the rebuilt op rounds ``W + ΔW`` once to the compute dtype in the forward (module doc of
        :mod:`.rebuild`), as this algorithm's full-W2 layers always have; the factors' gradients are exact
        functions of ∂y and x."""
        width = LoKr._in_m(t) * int(t["lokr_w2_b"].shape[0])
        return spec.out_dim * spec.flat_in <= LoKr.WGRAD_PER_H * width * (spec.out_dim + spec.flat_in)

    def rebuild_op(self, x, t, spec, weight, bias, multiplier):
        """Linear and zero-padded conv layers: the rebuilt op with :class:`_KronBuild` (own backward over
        the two factors, formed here under autograd; a trained ``scalar`` folded into W1)."""
        if not rebuild_supports(spec):
            return super().rebuild_op(x, t, spec, weight, bias, multiplier)
        w1 = self._w1(t)
        gain = self._gain(t)
        if isinstance(gain, torch.Tensor):
            w1, gain = w1 * gain.to(w1.dtype), 1.0
        return rebuilt_op(x, spec, weight, bias, _KronBuild(float(gain) * multiplier),
                          *_KronBuild.factors(w1, self._w2_flat(t)))

    def forward_accumulate(self, acc, x, t, spec, weight, bias, base_out, multiplier, inplace=False):
        """When the activation is at least as large as the weight (positions ≥ in·∏k): ΔW = γ·kron
        formed once in the activations' dtype and one GEMM/conv that adds into ``acc`` (m in its
        alpha) — fewer, larger kernels and only ΔW saved for backward. Otherwise the structured
        forms: linear ``acc + m·γ·vec(W1·X·W2ᵀ)`` with the W1 product as one batched GEMM adding
        into ``acc``; convs with m·γ folded into W1 before the kron einsum."""
        gain = self._gain(t)
        if isinstance(gain, torch.Tensor):
            return super().forward_accumulate(acc, x, t, spec, weight, bias, base_out, multiplier, inplace)
        s = gain * multiplier
        if FORCE_PATH is None and self._kron_lora_pays(t, spec):
            y = self._kron_lora(acc, x, t, spec, s, inplace)
            if y is not None:
                return y
        plain = spec.kind == LINEAR or (spec.kind in CONV_KINDS and spec.groups == 1
                                        and spec.padding_mode == "zeros" and x.dim() == len(spec.kernel) + 2)
        positions = x.numel() // (x.shape[-1] if spec.kind == LINEAR else x.shape[1] if x.dim() > 1 else 1)
        dense = positions >= spec.flat_in if FORCE_PATH is None else FORCE_PATH == "dense"
        if plain and dense and acc.dtype == x.dtype:
            tt = {k: (v.to(x.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in t.items()}
            dw = self.delta_weight(tt, spec)  # γ included, in x's dtype
            if spec.kind == LINEAR:
                return accumulate_linear(acc, x, dw, multiplier, inplace)
            d = _CONV_FN[spec.kind](x, dw, None, spec.stride, spec.padding, spec.dilation)
            return acc + d if multiplier == 1.0 else torch.add(acc, d, alpha=multiplier)
        if spec.kind == LINEAR:
            w1 = self._w1(t, x.dtype)
            out_l, in_m = w1.shape
            h = x.reshape(-1, in_m, x.shape[-1] // in_m)      # (T, in_m, in_n)
            if "lokr_w2" in t:
                h = F.linear(h, t["lokr_w2"].to(x.dtype))      # (T, in_m, out_k)
            else:
                h = F.linear(F.linear(h, t["lokr_w2_b"].to(x.dtype)), t["lokr_w2_a"].to(x.dtype))
            out_k = h.shape[-1]
            if acc.dtype == h.dtype and acc.is_contiguous() and acc.shape[:-1] == x.shape[:-1]:
                y = torch.baddbmm(acc.view(-1, out_l, out_k), w1.expand(h.shape[0], out_l, in_m), h, alpha=s)
                return y.view(acc.shape)
            y = torch.matmul(w1, h).reshape(acc.shape)
            return torch.add(acc, y.to(acc.dtype), alpha=s)
        if (spec.kind in CONV_KINDS and spec.groups == 1 and spec.padding_mode == "zeros"
                and x.dim() == len(spec.kernel) + 2):
            d = self._conv_delta(x, t, spec, w1_scale=s)
            return acc + d.to(acc.dtype)
        return super().forward_accumulate(acc, x, t, spec, weight, bias, base_out, multiplier, inplace)

    def forward_delta(self, x, t, spec, weight, bias, base_out):
        gain = self._gain(t)
        if spec.kind == LINEAR:
            w1 = self._w1(t, x.dtype)
            in_m = w1.shape[1]
            h = x.reshape(*x.shape[:-1], in_m, -1)             # (…, in_m, in_n)
            if "lokr_w2" in t:
                h = F.linear(h, t["lokr_w2"].to(x.dtype))      # (…, in_m, out_k)
            else:
                h = F.linear(h, t["lokr_w2_b"].to(x.dtype))
                h = F.linear(h, t["lokr_w2_a"].to(x.dtype))
            y = torch.matmul(w1, h)                             # (…, out_l, out_k)
            return y.reshape(*y.shape[:-2], -1) * gain
        if spec.kind in CONV_KINDS and spec.groups == 1 and spec.padding_mode == "zeros":
            return self._conv_delta(x, t, spec) * gain
        # grouped convs / padding modes: materialise ΔW
        return layer_op(x, spec, self.delta_weight(t, spec).to(x.dtype))

    def _conv_delta(self, x, t, spec, w1_scale: float = 1.0):
        conv = _CONV_FN[spec.kind]
        nk = len(spec.kernel)
        ones = (1,) * nk
        unbatched = x.dim() == nk + 1
        if unbatched:
            x = x.unsqueeze(0)
        w1 = self._w1(t, x.dtype)
        if w1_scale != 1.0:
            w1 = w1 * w1_scale
        in_m = w1.shape[1]
        n = x.shape[0]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"].to(x.dtype)
            h = conv(x.reshape(n * in_m, -1, *x.shape[2:]), w2.reshape(w2.shape[0], -1, *spec.kernel), None,
                     spec.stride, spec.padding, spec.dilation)          # in_m folded into the batch
        else:
            a = t["lokr_w2_a"].to(x.dtype)
            a = a.t() if "lokr_t2" in t else a                         # (out_k, r)
            h = conv(self._grouped_down(x, t, spec, in_m, x.dtype), a.reshape(a.shape[0], -1, *ones))
        h = h.reshape(n, in_m, *h.shape[1:])              # (N, in_m, out_k, *sp')
        y = torch.einsum("ij,nj...->ni...", w1, h)        # (N, out_l, out_k, *sp')
        y = y.reshape(n, -1, *y.shape[3:])
        return y.squeeze(0) if unbatched else y

    def export(self, t):
        out = {k: v for k, v in t.items() if k != "scalar"}
        if "scalar" in t:
            k = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
            out[k] = t[k] * t["scalar"]
        return out

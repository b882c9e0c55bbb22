"""Orthogonal fine-tuning: Diag-OFT (block-diagonal rotation) and BOFT (butterfly of rotations).

Both rotate the *output features* of a layer — an orthogonal map applied to the rows of W (and, in
the bypass path, to the channels of ``f(x) − b``) — and leave the bias untouched.
Layers: linear and conv1d/2d/3d without groups (mixing rows across groups would not be a grouped
conv any more).

File tensors (LyCORIS):
  ``oft_blocks``  Diag-OFT ``(num_blocks, b, b)``; BOFT ``(m, num_blocks, b, b)`` (detection: ndim 3 / 4)
  ``rescale``     optional ``(out, 1, …)`` per-output-row gain applied after the rotation
  ``alpha``       the COFT constraint (see "constraint convention" below)

Rotation (both): ``Q = B − Bᵀ`` (skew-symmetric); COFT: if ``‖Q‖_F + 1e-8 > κ`` (Frobenius norm over
*all* blocks — and for BOFT all stages — jointly, κ > 0), ``Q ← Q·κ/(‖Q‖_F + 1e-8)``; Cayley
``R = (I+Q)(I−Q)⁻¹``, computed as ``solve(I−Q, I+Q)`` (the factors commute) in fp32, or fp64 when
the blocks are fp64, whatever the weight's dtype.

Diag-OFT, per block k of b output rows (LyCORIS merge, A1111 and ComfyUI all agree):
  ``W'[k·b+j, …] = Σ_n R_k[n, j]·W[k·b+n, …]``  i.e. **Rᵀ** per block,
  then ``W' ← rescale ⊙ W'``; ΔW = W' − W. Multiplier: ``W + m·ΔW`` (linear in m). Without
  rescale this is exactly LyCORIS's ``R_m = I + m(R − I)``; with rescale LyCORIS leaves the rescale
  un-interpolated (``rescale ⊙ R_mᵀW``, which is not W at m = 0) — we scale the whole delta, as
  the loaders' ``W + m·ΔW`` does, so m = 0 is the base model. Both agree at m = 1. (ComfyUI's
  Diag-OFT ignores ``rescale`` and applies its strength twice, ``W + s²ΔW``; A1111 ignores
  ``rescale`` too: loader bugs we do not copy.)

BOFT: stage i (i = 0…m−1, k = 2^i·b/2) permutes the output axis by viewing it as ``(-1, 2, k)`` and
swapping the last two axes, applies **R** (not Rᵀ) of stage i to consecutive groups of b, and
permutes back (checked numerically against LyCORIS 4.1.3). Multiplier: each stage is interpolated,
``R_{i,m} = I + m(R_i − I)`` (LyCORIS, ComfyUI), and so is the rescale, ``1 + m(rescale − 1)``
(LyCORIS leaves it alone; see above). The result is not linear in m: :meth:`BOFT.merged` is
overridden and ``forward_delta`` takes the multiplier.

Bias: never rotated. LyCORIS's bypass rotates ``f(x)`` including the bias while its merge (and
every loader) leaves the bias alone; we follow the merge: ``Δy = rotate(f(x) − b) − (f(x) − b)``.

Constraint convention (a decision, needed because the ecosystem disagrees):
  * LyCORIS trains with κ = constraint·out_dim and writes ``alpha = constraint``; A1111 also uses
    κ = alpha·out_dim (and clamps even when alpha = 0, collapsing such files to the identity);
  * ComfyUI uses κ = alpha.
  Reading: by default we use LyCORIS's κ = alpha·out_dim (``convention="lycoris"``): LyCORIS is
  what trains these files and its forward is what its users saw. ``with_convention("comfyui")``
  gives an instance with κ = alpha, for the Adapter layer to offer ComfyUI's reading.
  Writing: :meth:`export` calls :meth:`bake_constraint`, which applies the constraint to
  ``oft_blocks`` itself and writes ``alpha`` just above the resulting ‖Q‖_F, so that no loader
  clamps any more — κ = alpha, κ = alpha·out, and A1111's always-on clamp all give the same R.
  (A file read back by LyCORIS for further training then has a looser constraint, alpha·out.)
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Mapping

import torch
import torch.nn.functional as F

from ..errors import ConfigError, ShapeMismatch
from .base import (
    CONV1D, CONV2D, CONV3D, LINEAR, Algorithm, Tensors, accumulate_conv1x1, accumulate_linear, alpha_tensor,
    channel_view, register, scalar_of,
)
from . import factor_batch, graph_policy, oft_triton
from .factorize import factorization, power2factorization
from .lowrank import _compute_dtype
from .rebuild import cast, rebuilt_op, supports as rebuild_supports

CONVENTIONS = ("lycoris", "comfyui")
_EPS = 1e-8  # added to ‖Q‖ before comparing with κ, as LyCORIS and ComfyUI do


# --------------------------------------------------------------------------------------
# Rotations
# --------------------------------------------------------------------------------------


_EYES: dict = {}


def _eye(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The n×n identity, made once per (n, dtype, device): the OFT/BOFT paths subtract or add it several
    times per layer per step (the first rebuilt Diag-OFT path: 8 ``torch.eye`` calls per layer per forward +
    backward, CPU op count 160 for 20 layers), each a fresh allocation and fill (issue 7: OFT is
    launch-bound).
    Read-only by contract (every use is out of place). Made outside inference mode (an inference
    tensor could not enter a later training step's autograd graph); plain ``torch.eye`` under
    ``torch.compile``, which folds it."""
    if torch.compiler.is_compiling():
        return torch.eye(n, dtype=dtype, device=device)
    key = (n, dtype, device)
    e = _EYES.get(key)
    if e is None:
        with torch.inference_mode(False), torch.no_grad():
            e = _EYES[key] = torch.eye(n, dtype=dtype, device=device)
    return e


def compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def kappa_of(alpha: float | None, out_dim: int, convention: str = "lycoris") -> float | None:
    """The norm bound κ for ``alpha`` under a convention; None = unconstrained."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"OFT constraint convention {convention!r}; expected one of {CONVENTIONS}")
    if alpha is None or not math.isfinite(alpha) or alpha <= 0:
        return None
    return alpha * out_dim if convention == "lycoris" else alpha


def constrained_q(blocks: torch.Tensor, kappa: float | None) -> torch.Tensor:
    """``Q = B − Bᵀ`` scaled down to ‖Q‖_F + 1e-8 ≤ κ when it exceeds it (joint norm)."""
    q = blocks - blocks.transpose(-1, -2)
    if kappa is None:
        return q
    n = torch.linalg.vector_norm(q) + _EPS
    # κ / max(n, κ): exactly 1 when inside the bound, κ/n outside; no host sync, differentiable
    return q * (kappa / torch.clamp(n, min=kappa))


def cayley(q: torch.Tensor) -> torch.Tensor:
    """``R = (I+Q)(I−Q)⁻¹`` for a batch of skew-symmetric blocks (= (I−Q)⁻¹(I+Q))."""
    eye = _eye(q.shape[-1], q.dtype, q.device)
    # solve_ex, not solve: solve checks for singular input with a device→host sync (once per layer
    # per forward on CUDA, and it makes the step impossible to capture in a CUDA graph); I − Q is
    # always invertible for a skew-symmetric Q (its eigenvalues are 1 − iλ), so the check is moot.
    return torch.linalg.solve_ex(eye - q, eye + q)[0]


def oft_rotations(blocks: torch.Tensor, kappa: float | None) -> torch.Tensor:
    """R for every block (and stage), in fp32 or wider."""
    return cayley(constrained_q(blocks.to(compute_dtype(blocks)), kappa))


def _rows_last(v: torch.Tensor, axis: int) -> torch.Tensor:
    return v.movedim(axis, -1) if axis not in (-1, v.dim() - 1) else v


def diag_rotate_delta(v: torch.Tensor, r_minus_i: torch.Tensor) -> torch.Tensor:
    """``Rᵀv − v`` per block along the *last* axis of ``v`` (``(R − I)`` given, for precision)."""
    nb, b, _ = r_minus_i.shape
    vb = v.reshape(v.shape[:-1] + (nb, b))
    return torch.einsum("knm,...kn->...km", r_minus_i, vb).reshape(v.shape)


class _RotateOutput(torch.autograd.Function):
    """Diag-OFT on channel-last rows at multiplier 1: ``out = y + (y − b)·M`` blockwise with
    ``M = R − I`` (so ``out − b = (y − b)·R`` per block), keeping ``out`` — not ``y`` — for backward.

    Autograd would save ``y − b`` (one activation per adapted layer) for ∂M. ``out`` is usually
    kept alive anyway by what consumes it (attention saves q/k/v, GEGLU its halves, LayerNorm its
    input), so saving it instead costs nothing there; backward recovers ``y − b = (out − b)·Rᵀ``
    (R is orthogonal: exact up to rounding — a bf16 rounding of ``out`` gives a 2⁻⁸-relative error
    in ∂M only, never in the forward or in ∂x). Costs two activation passes more in backward."""

    @staticmethod
    def forward(ctx, y, mat, bias):
        nb, b = mat.shape[0], mat.shape[1]
        v = y if bias is None else y - bias
        d = torch.bmm(v.reshape(-1, nb, b).transpose(0, 1), mat)          # (k, T, j)
        out = torch.empty_like(y, memory_format=torch.contiguous_format)  # a base tensor, not a view
        torch.add(y.reshape(-1, nb, b), d.transpose(0, 1), out=out.view(-1, nb, b))
        ctx.save_for_backward(out, mat, bias)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, mat, bias = ctx.saved_tensors
        nb, b = mat.shape[0], mat.shape[1]
        g3 = grad.reshape(-1, nb, b).transpose(0, 1)                       # (k, T, j)
        gy = gmat = None
        if ctx.needs_input_grad[0]:
            gy = (grad.reshape(-1, nb, b) + torch.bmm(g3, mat.transpose(1, 2)).transpose(0, 1)).reshape(grad.shape)
        if ctx.needs_input_grad[1]:
            w = out if bias is None else out - bias
            w3 = w.reshape(-1, nb, b).transpose(0, 1)                      # (k, T, j)
            v3 = torch.baddbmm(w3, w3, mat.transpose(1, 2))               # (y − b) = (out − b)·Rᵀ
            gmat = torch.bmm(v3.transpose(1, 2), g3)                       # (k, n, j)
        return gy, gmat, None


@functools.lru_cache(maxsize=256)
def butterfly_perm(out_dim: int, b: int, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse) gathering the output axis into stage ``stage``'s consecutive blocks of ``b``.

    Position p of the gathered axis reads channel ``perm[p]``: the axis viewed as
    ``(c, 2, k)`` (k = 2^stage·b/2) with its last two axes swapped, then flattened.
    CPU index tensors, cached (they depend on the shape only).
    """
    k = (2 ** stage) * (b // 2)
    perm = torch.arange(out_dim).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
    return perm, torch.argsort(perm)


@functools.lru_cache(maxsize=512)
def _butterfly_perm_on(out_dim: int, b: int, stage: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`butterfly_perm` on ``device``, cached (no host→device copy per call)."""
    perm, inv = butterfly_perm(out_dim, b, stage)
    return perm.to(device), inv.to(device)


def _perms(out_dim: int, b: int, stage: int, device: torch.device, compiling: bool):
    if compiling:  # traced into the graph as constants; the caches are for eager calls
        return tuple(p.to(device) for p in butterfly_perm.__wrapped__(out_dim, b, stage))
    return _butterfly_perm_on(out_dim, b, stage, device)


def _chain_indices(out_dim: int, b: int, stages: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Row gathers for the butterfly applied stage by stage in each stage's own (gathered) order:
    ``z_0 = u[g_0]``, ``z_i = z′_{i−1}[g_i]`` (``g_i = inv_{i−1}[perm_i]``: back from stage i−1's order and on
    into stage i's in one gather), ``B(u) = z′_{m−1}[g_m]`` (``g_m = inv_{m−1}``); and the inverses (for the
    backward). CPU index tensors."""
    perm_of = butterfly_perm.__wrapped__ if torch.compiler.is_compiling() else butterfly_perm
    perms = [perm_of(out_dim, b, i) for i in range(stages)]
    g = [perms[0][0]] + [perms[i - 1][1][perms[i][0]] for i in range(1, stages)] + [perms[-1][1]]
    return tuple(g), tuple(torch.argsort(x) for x in g)


@functools.lru_cache(maxsize=256)
def _chain_indices_on(out_dim: int, b: int, stages: int, device: torch.device):
    g, ginv = _chain_indices(out_dim, b, stages)
    return tuple(x.to(device) for x in g), tuple(x.to(device) for x in ginv)


def _chain(out_dim: int, b: int, stages: int, device: torch.device):
    if torch.compiler.is_compiling():  # constants in the graph; the cache is for eager calls
        g, ginv = _chain_indices(out_dim, b, stages)
        return tuple(x.to(device) for x in g), tuple(x.to(device) for x in ginv)
    return _chain_indices_on(out_dim, b, stages, device)


def butterfly_rows(w: torch.Tensor, stage_deltas: torch.Tensor, inputs: list | None = None) -> torch.Tensor:
    """``B(W)`` on the *rows* of a weight ``(out, …)`` in ``stage_deltas``' dtype (the same map as
    :func:`_butterfly_apply` on the out axis), for the rebuild: the rows are gathered once into stage 0's
    blocks, each stage is one batched GEMM with the add fused (``z′ = z + Δ_i·z`` on ``(blocks, b, rest)``),
    and one gather takes stage i's order to stage i+1's (``_chain_indices``): 2 kernels per stage, where the
    loop on rows-last activations needs ≈ 6 (two gathers along a strided axis, adds, einsum copies).
    ``inputs`` receives each stage's input ``z_i`` in blocks (for the backward). The running value is
    carried whole in ``stage_deltas``' dtype (fp32 or wider) and rounded once by the caller."""
    m, nb, b, _ = stage_deltas.shape
    out = w.shape[0]
    g, _ = _chain(out, b, m, w.device)
    z = w.reshape(out, -1).index_select(0, g[0]).to(stage_deltas.dtype)
    for i in range(m):
        zb = z.view(nb, b, -1)
        if inputs is not None:
            inputs.append(zb)
        z = torch.baddbmm(zb, stage_deltas[i], zb).view(out, -1).index_select(0, g[i + 1])
    return z.view(w.shape)


def butterfly_delta(v: torch.Tensor, rots: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """``B_m(v) − v`` along the last axis of ``v``: stage by stage, R_{i,m} = I + m(R_i − I).

    The increment is accumulated separately from ``v`` so that it keeps its precision. ``rots`` may
    be in a narrower dtype than they were computed in only through ``stage_deltas`` (R − I is
    formed before any cast: I + small would lose the small part in bf16).
    """
    m, nb, b, _ = rots.shape
    eye = _eye(b, rots.dtype, rots.device)
    return _butterfly_apply(v, multiplier * (rots - eye))


def _butterfly_apply(v: torch.Tensor, stage_deltas: torch.Tensor, inputs: list | None = None) -> torch.Tensor:
    """``B(v) − v`` with stage i's block map ``I + stage_deltas[i]`` (already scaled). ``inputs``: a list
    that receives each stage's input in blocks (for a backward by hand, :class:`_BOFTBuild`)."""
    m, nb, b, _ = stage_deltas.shape
    out_dim = v.shape[-1]
    d = torch.zeros_like(v)
    compiling = torch.compiler.is_compiling()
    for i in range(m):
        perm, inv = _perms(out_dim, b, i, v.device, compiling)
        cur = (v + d).index_select(-1, perm).reshape(v.shape[:-1] + (nb, b))
        if inputs is not None:
            inputs.append(cur)
        step = torch.einsum("dij,...dj->...di", stage_deltas[i], cur)
        d = d + step.reshape(v.shape).index_select(-1, inv)
    return d


def _rescale_vec(t: Mapping[str, torch.Tensor], dtype) -> torch.Tensor | None:
    rs = t.get("rescale")
    return None if rs is None else rs.reshape(-1).to(dtype)


# --------------------------------------------------------------------------------------
# The shared part of both algorithms
# --------------------------------------------------------------------------------------


class _OFTBase(Algorithm):
    keys = frozenset({"oft_blocks", "rescale", "alpha"})
    detect_keys = ("oft_blocks",)
    kinds = (LINEAR, CONV1D, CONV2D, CONV3D)
    options = {"constraint": 0.0, "rescaled": False}
    weight_independent = False
    blocks_ndim = 0

    def __init__(self, convention: str = "lycoris"):
        kappa_of(None, 1, convention)  # validates the name
        self.convention = convention

    def __repr__(self):
        return f"{type(self).__name__}(convention={self.convention!r})"

    def with_convention(self, convention: str) -> "_OFTBase":
        """The same algorithm reading ``alpha`` with another constraint convention (see module doc)."""
        return type(self)(convention)

    @classmethod
    def detect(cls, keys, tensors=None):
        if "oft_blocks" not in keys:
            return False
        if tensors is None:  # no shapes: the 3-D (diag) reading is the common one
            return cls.blocks_ndim == 3
        return tensors["oft_blocks"].dim() == cls.blocks_ndim

    def supports(self, spec):
        return spec.kind in self.kinds and spec.groups == 1

    @staticmethod
    def out_dim_of(t) -> int:
        b = t["oft_blocks"]
        return int(b.shape[-3] * b.shape[-1])

    def kappa(self, t) -> float | None:
        return kappa_of(scalar_of(t), self.out_dim_of(t), self.convention)

    def rotations(self, t) -> torch.Tensor:
        return oft_rotations(t["oft_blocks"], self.kappa(t))

    def _check(self, t, spec):
        if self.out_dim_of(t) != spec.out_dim:
            raise ShapeMismatch("(oft)", tuple(t["oft_blocks"].shape), (spec.out_dim,), key="oft_blocks",
                                detail=f"blocks cover {self.out_dim_of(t)} output features")

    def rank(self, t):
        return int(t["oft_blocks"].shape[-1])  # the block size (what LyCORIS's lora_dim becomes)

    def scale(self, t):
        return 1.0

    def _new_tensors(self, blocks_shape, spec, opts) -> Tensors:
        t: Tensors = {"oft_blocks": torch.zeros(blocks_shape, dtype=torch.float32)}
        if opts.get("rescaled"):
            # (out, 1, …) with the weight's rank, as LyCORIS writes it
            shape = (spec.out_dim,) + (1,) * (len(spec.weight_shape) - 1)
            t["rescale"] = torch.ones(shape, dtype=torch.float32)
        t["alpha"] = alpha_tensor(float(opts.get("constraint") or 0.0))  # = constraint, as LyCORIS
        return t

    # -- writing -----------------------------------------------------------------------
    def bake_constraint(self, t: Mapping[str, torch.Tensor], spec=None, margin: float = 1e-2) -> Tensors:
        """Tensors whose ``oft_blocks`` already satisfy the constraint, with ``alpha`` ≥ ‖Q‖_F.

        The blocks are scaled by the factor the constraint would apply (so Q is the constrained
        Q), then ``alpha = ‖Q‖_F·(1 + margin) + 1e-6``: every loader (κ = alpha, κ = alpha·out,
        A1111's clamp that is always on) then leaves Q alone and computes the same R. The
        default margin (1 %) also covers rounding the blocks and alpha to fp16/bf16 on save.
        """
        if spec is not None:
            self._check(t, spec)
        out = {k: v for k, v in t.items()}
        blocks = t["oft_blocks"]
        kappa = self.kappa(t)
        with torch.no_grad():
            q = (blocks - blocks.transpose(-1, -2)).to(torch.float64)
            n = float(torch.linalg.vector_norm(q)) + _EPS
            if kappa is not None and n > kappa:
                blocks = blocks * (kappa / n)
                n = float(torch.linalg.vector_norm((blocks - blocks.transpose(-1, -2)).to(torch.float64)))
            else:
                n -= _EPS
        out["oft_blocks"] = blocks
        out["alpha"] = alpha_tensor(n * (1.0 + margin) + 1e-6)
        return out

    def export(self, t):
        return self.bake_constraint(t)

    def _own_build(self, m: float, kappa: float | None):
        """The rebuild's build with its own backward (``_DiagOFTBuild`` / ``_BOFTBuild``)."""
        raise NotImplementedError

    def rebuild_op(self, x, t, spec, weight, bias, multiplier):
        """Without ``rescale``: the rebuilt op with the algorithm's own build (own backward, the Cayley
        inverse from the layers' batch); with it, the shared op over :meth:`merged` (autograd)."""
        if "rescale" in t:
            return super().rebuild_op(x, t, spec, weight, bias, multiplier)
        self._check(t, spec)
        if not rebuild_supports(spec):
            return None
        build = _batched_build(self._own_build(float(multiplier), self.kappa(t)), t["oft_blocks"], weight, bias)
        return rebuilt_op(x, spec, weight, bias, build, t["oft_blocks"])

    def describe(self, t):
        b = t["oft_blocks"]
        return {"rank": self.rank(t), "alpha": scalar_of(t), "scale": 1.0, "block_size": int(b.shape[-1]),
                "num_blocks": int(b.shape[-3]), "constraint": self.kappa(t), "convention": self.convention,
                "rescaled": "rescale" in t}


# --------------------------------------------------------------------------------------
# Diag-OFT
# --------------------------------------------------------------------------------------


@register
class DiagOFT(_OFTBase):
    name = "diag-oft"
    aliases = ("oft",)
    blocks_ndim = 3

    def create(self, spec, opts, weight=None, generator=None) -> Tensors:
        # the requested rank is a block size; LyCORIS factorises so that block size ≤ block count
        b, nb = factorization(spec.out_dim, int(opts["rank"]))
        return self._new_tensors((nb, b, b), spec, opts)

    def _delta_rows_last(self, t, v: torch.Tensor) -> torch.Tensor:
        """ΔW (or Δy) for channel-last ``v`` at multiplier 1: rescale ⊙ (Rᵀ v) − v."""
        r = self.rotations(t).to(v.dtype)
        eye = _eye(r.shape[-1], r.dtype, r.device)
        d = diag_rotate_delta(v, r - eye)
        rs = _rescale_vec(t, v.dtype)
        if rs is not None:
            d = rs * d + (rs - 1) * v  # rescale ⊙ (v + d) − v
        return d

    def delta_weight(self, t, spec, weight=None):
        if weight is None:
            raise ValueError("OFT needs the base weight (ΔW = (R − I)ᵀW blockwise)")
        self._check(t, spec)
        w = weight.to(compute_dtype(weight, t["oft_blocks"]))
        return self._delta_rows_last(t, w.movedim(0, -1)).movedim(-1, 0)

    def forward_delta(self, x, t, spec, weight, bias, base_out, multiplier: float = 1.0):
        self._check(t, spec)
        y = base_out if bias is None else base_out - _channel(bias, spec, base_out)
        axis = 1 if spec.is_conv else -1
        v = _rows_last(y, axis).to(compute_dtype(y, t["oft_blocks"]))
        d = self._delta_rows_last(t, v) * multiplier  # linear in m
        return d.movedim(-1, axis).to(x.dtype) if axis == 1 else d.to(x.dtype)

    def _own_build(self, m: float, kappa: float | None):
        return _DiagOFTBuild(m, kappa)

    def rebuild_op(self, x, t, spec, weight, bias, multiplier):
        # In captured steps a linear layer with many inputs keeps its output and takes the rotation's gradient from it
        # (_RotateKeepOutput's doc: no weight-gradient GEMM); everything else takes the rebuilt op
        if "rescale" not in t and _keep_output(x, spec, weight, bias, t["oft_blocks"], float(multiplier)):
            self._check(t, spec)
            blocks = t["oft_blocks"]
            build = _batched_build(self._own_build(1.0, self.kappa(t)), blocks, weight, bias)
            # on rows, reshaped after (as the rebuilt op: a GEGLU reading the output must find it from its halves)
            x2 = x.reshape(-1, x.shape[-1])
            y = _RotateKeepOutput.apply(x2, weight, bias, blocks, build)
            return y if x2 is x else y.view(*x.shape[:-1], y.shape[-1])
        return super().rebuild_op(x, t, spec, weight, bias, multiplier)

    def prefers_rebuild_for(self, t, spec):
        # Decision (GPU runs 17–19, H200, SD1.5 b8, ``lin`` layers, PEFT 0.21 OFT block 16 in the same run):
        # the rebuilt op (W′ = W + (R − I)ᵀW per block, own backward, Cayley inverse kept) against the
        # delta path (output rotated by batched b×b GEMMs over every position): one-graph device time
        # 85.5–86.1 vs 115.1–115.7 ms (PEFT 105.3–106.0), eager 140.6–145.1 vs 170.3–177.3 ms, peak 8.75
        # vs 8.77 GiB (PEFT 9.10). With ``rescale`` the rebuild would go through autograd (no own backward):
        # the delta path stays. ``mode = "bypass"`` keeps the delta path for any file.
        return "rescale" not in t and rebuild_supports(spec)

    def forward_accumulate(self, acc, x, t, spec, weight, bias, base_out, multiplier, inplace=False):
        """``acc + m·(Rᵀ − I)(f(x) − b)`` blockwise, in the activations' dtype: R is computed (and
        R − I formed) in fp32, scaled by m, then cast; one batched GEMM over the blocks reads the
        output channels in place (no channel-last copy, no fp32 copy of the activations) and one add."""
        if "rescale" in t or acc.dtype != base_out.dtype or (spec.is_conv and base_out.dim() < 3):
            return super().forward_accumulate(acc, x, t, spec, weight, bias, base_out, multiplier, inplace)
        self._check(t, spec)
        r = self.rotations(t)
        nb, b = r.shape[0], r.shape[-1]
        eye = _eye(b, r.dtype, r.device)
        mat = ((r - eye) * multiplier).to(acc.dtype)   # mat[k, n, j]: d[k·b+j] = Σ_n mat[k,n,j]·v[k·b+n]
        if inplace and not spec.is_conv and acc is base_out and multiplier == 1.0 and acc.is_contiguous():
            # the only adapter on this layer (the host passes inplace=True only then, and never
            # under torch.compile): keep the output, not f(x) − b, for backward. (A model that
            # then modified the output in place would get autograd's "modified by an inplace
            # operation" error, never a wrong gradient.)
            return _RotateOutput.apply(base_out, mat, None if bias is None else bias.to(acc.dtype))
        y = base_out if bias is None else base_out - _channel(bias, spec, base_out)
        if spec.is_conv:
            n = y.shape[0]
            v = y.reshape(n, nb, b, -1)                                   # (N, k, n, s)
            d = torch.matmul(mat.transpose(1, 2), v)                      # (N, k, j, s)
            return (acc.reshape(n, nb, b, -1) + d).reshape(acc.shape)
        v = y.reshape(-1, nb, b).transpose(0, 1)                          # (k, T, n), a view
        d = torch.bmm(v, mat)                                             # (k, T, j)
        return (acc.reshape(-1, nb, b) + d.transpose(0, 1)).reshape(acc.shape)


# --------------------------------------------------------------------------------------
# BOFT
# --------------------------------------------------------------------------------------


def _inverse_compute(live, cdt, token):
    """:class:`.factor_batch.PassBatch`'s ``compute`` for OFT: ``M = (I − Q)⁻¹`` of every member's blocks in one
    batched call (no autograd record: the M's are constants, each layer's backward uses its own kept M)."""
    n = live[0][0].shape[-1]
    with torch.no_grad():
        flat = torch.cat([b.detach().reshape(-1, n, n) for (b,) in live])
        i_minus_q = torch.sub(_eye(n, cdt, flat.device), flat).add_(flat.transpose(-1, -2))
        minv = torch.linalg.inv_ex(i_minus_q)[0]
    sizes = [b.numel() // (n * n) for (b,) in live]
    return [m.view(b.shape) for m, (b,) in zip(minv.split(sizes), live)]


#: (block size, blocks dtype, compute dtype, device) → the batch of the unconstrained Diag-OFT/BOFT layers
_INVERSE_BATCHES: dict[tuple, factor_batch.PassBatch] = {}


def batched_inverse(blocks: torch.Tensor, cdt: torch.dtype, own) -> torch.Tensor:
    """This layer's ``M = (I − Q)⁻¹`` (unconstrained ``Q = B − Bᵀ``) from one batched call per forward pass over
    the unconstrained Diag-OFT/BOFT layers of its block size, blocks dtype, compute dtype and device, instead of
    one per layer (issue 7: the per-layer Cayley was ≈ 8 small kernels of an OFT layer's forward; 192 layers on
    SD1.5); ``own()`` computes it for this layer alone. The bookkeeping is :class:`.factor_batch.PassBatch`'s
    (which layers, when recomputed, CUDA graph captures, members whose storage was freed); the M's are
    constants for autograd, so they stay held and a layer's first call computes its own without an autograd
    record (checkpointing counts what a pass saves). Gradient checkpointing's re-run recomputes (same values)."""
    key = (blocks.shape[-1], blocks.dtype, cdt, blocks.device)
    batch = _INVERSE_BATCHES.get(key)
    if batch is None:
        # the module-level function looked up per call (tests count its calls)
        batch = _INVERSE_BATCHES[key] = factor_batch.PassBatch(lambda *a: _inverse_compute(*a), serve_once=False)

    def first():
        with torch.no_grad():
            return own()
    return batch.get((blocks,), cdt, first)


def _batched_build(build, blocks, weight, bias):
    """``build`` with its M taken from the batch when the layer qualifies: unconstrained, the base frozen
    (the rebuilt op then runs the build's own forward; a trainable base goes through autograd instead),
    gradients on, not under ``torch.compile`` (which traces the per-layer form)."""
    if (build.kappa is None and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not weight.requires_grad and not (bias is not None and bias.requires_grad)
            and not getattr(blocks, "_fsdp_flattened", False)):  # FSDP frees its units' storage between calls
        cdt = compute_dtype(weight, blocks)
        build.minv = batched_inverse(blocks, cdt, lambda: build._inverse(blocks, cdt)[0])
    return build


def _full_precision(t: torch.Tensor):
    """A context without autocast on ``t``'s device when autocast is on there (else a no-op one)."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


class _CayleyBuild:
    """What the Diag-OFT and BOFT builds for :mod:`.rebuild` share: multiplier ``m``, constraint κ, the
    rotations from the blocks, and the backward from ``∂R`` to ``∂blocks`` — no nested autograd
    (whose per-layer host time made the rebuilt BOFT step 1.26× slower than the delta path, run 8):

    * Cayley ``R = (I − Q)⁻¹(I + Q)`` through ``M = (I − Q)⁻¹`` alone: ``M·(I − Q) = I`` gives ``M·Q = M − I``,
      so ``R = M + M·Q = 2M − I`` and ``R − I = 2(M − I)`` — one batched inverse and one subtraction (the
      subtraction's rounding, one ulp of 1 in fp32, is the rounding any fp32 R carries). Backward:
      ``dR = 2·dM = 2·M·dQ·M``, so ``∂Q = 2·Mᵀ·∂R·Mᵀ`` from the kept M (blocks-sized) — no second solve;
    * the joint constraint ``Q = Q₀·κ/max(n, κ)``, ``n = ‖Q₀‖ + ε``: ``∂Q₀ = s·∂Q − [n > κ]·(κ/n²)·
      ⟨∂Q, Q₀⟩·Q₀/‖Q₀‖``; ``Q₀ = B − Bᵀ``: ``∂B = ∂Q₀ − ∂Q₀ᵀ``.

    Why (issue 7, GPU runs 17–18, H200): OFT's rebuilt step is bound by its kernel count — a batched
    solve of 16×16 blocks is ≈ 5 kernels (LU, two triangular solves, copies) and the first form solved
    twice per layer and added and subtracted identities ≈ 6 times (graph 93.6 ms; 85.5 after keeping the
    inverse)."""

    def __init__(self, m: float, kappa: float | None):
        self.m, self.kappa = m, kappa
        self.minv = None  # M from the layers' batch (:func:`_batched_build`), for the own forward only

    def _kept_inverse(self, blocks, cdt):
        """:meth:`_inverse` for the own forward: the batch's M when one was given."""
        if self.minv is not None:
            return self.minv, None, None, None
        return self._inverse(blocks, cdt)

    def _inverse(self, blocks, cdt):
        """``(M, Q₀, n, s)``: ``M = (I − Q)⁻¹`` and what the constraint's backward needs (None when
        unconstrained). Differentiable (the ``__call__`` forms)."""
        eye = _eye(blocks.shape[-1], cdt, blocks.device)
        if self.kappa is None:
            # I − Q = I − B + Bᵀ in two kernels, the cast to cdt folded into the first
            i_minus_q = torch.sub(eye, blocks).add_(blocks.transpose(-1, -2))
            q0 = n = sc = None
        else:
            q0 = blocks.to(cdt)
            q0 = q0 - q0.transpose(-1, -2)
            n = torch.linalg.vector_norm(q0) + _EPS
            sc = self.kappa / torch.clamp(n, min=self.kappa)
            i_minus_q = eye - q0 * sc
        minv = torch.linalg.inv_ex(i_minus_q)[0]   # inv_ex, not inv: no device→host error check
        return minv, q0, n, sc

    def _delta(self, minv, scale: float):
        """``scale·(R − I) = 2·scale·(M − I)`` (differentiable)."""
        return (minv - _eye(minv.shape[-1], minv.dtype, minv.device)) * (2.0 * scale)

    def _blocks_grad(self, blocks, keep, gr, scale: float = 1.0):
        """``∂blocks`` (in their dtype) from ``∂R/scale`` (R's shape, M's dtype) and the kept ``(M, Q₀, n, s)``."""
        minv, q0, n, sc = keep
        cdt = minv.dtype
        b = minv.shape[-1]
        mt = minv.transpose(-1, -2)
        with _full_precision(minv):  # (a backward called inside an autocast region on the CPU runs under it)
            t = (mt @ gr).reshape(-1, b, b)                                               # Mᵀ·∂R
            gq = torch.baddbmm(t, t, mt.reshape(-1, b, b), beta=0, alpha=2.0 * scale).reshape(minv.shape)
        if n is not None:
            norm = n - _EPS
            outside = (n > self.kappa).to(cdt)
            coef = outside * (self.kappa / (n * n)) * (gq * q0).sum() / norm.clamp_min(torch.finfo(cdt).tiny)
            gq = gq * sc - coef * q0
        return torch.sub(gq, gq.transpose(-1, -2), out=torch.empty(gq.shape, dtype=blocks.dtype, device=gq.device))


class _DiagOFTBuild(_CayleyBuild):
    """Diag-OFT (no ``rescale``) for :mod:`.rebuild` at multiplier ``m``: ``W′ = W + m·(R − I)ᵀW`` per block
    of b output rows, i.e. with the weight viewed ``(k, b, rest)`` (rest = in·∏kernel) and
    ``A′_k = m·(R_k − I)ᵀ``: ``W′_k = W_k + A′_k·W_k`` — one batched GEMM with the add fused
    (``baddbmm``: one rounding of W′), A′ cast to the weight's dtype (as the delta path casts it to the
    activations') and kept for the backward's rebuild. Backward: ``∂A′_k = E_k·W_kᵀ`` (one weight-sized
    batched GEMM reading ``E = ∂L/∂W′``), ``∂R_k = m·∂A′_kᵀ``, then :meth:`_CayleyBuild._blocks_grad`.

    Why (issue 7): the delta path rotates the *output* — batched b×b GEMMs over every position, forward
    and backward (run 8, H200, SD1.5 b8: 116.0 ms as one CUDA graph vs PEFT 105.3); rotating the
    *weight* is a weight-sized batched GEMM, and the layer pays one weight-gradient GEMM instead.

    Where :func:`.oft_triton.kernels_usable` holds (captured steps, CUDA bf16/fp16, b a power of two 16–64) the build is
    one launch that forms A′ from M itself (:func:`.oft_triton.rotate_rows`: A′ is then not kept, ``None`` in its place)
    and the unconstrained Cayley backward another (:meth:`_grad_from`); H100, SDXL b4 with the output-keeping op: 237.81 ms
    per step without them (run 216), 195.28 with them (run 218; benchmarks/NOTES.md change 127)."""

    def _grad_from(self, blocks, w, keep, part, gram: bool):
        """``∂blocks`` from fp32 sums ``part`` (``(P, nb, b, b)`` partials or ``(nb, b, b)``): with ``gram`` the block
        Gram G of :class:`_RotateKeepOutput` (``∂A′ = G·Rᵀ``), else ``∂A′`` itself; ``keep`` = (M, Q₀, n, s). One
        launch of :func:`.oft_triton.cayley_grad` where the blocks are unconstrained and the kernels run
        (:func:`.oft_triton.kernels_usable`), else :meth:`_CayleyBuild._blocks_grad`."""
        minv, n = keep[0], keep[2]
        if n is None and oft_triton.kernels_usable(w, minv):
            return oft_triton.cayley_grad(part, minv, 2.0 * self.m, blocks.dtype, gram)
        g = part.to(minv.dtype)
        if g.dim() == 4:
            g = g.sum(0)
        if gram:
            g = torch.bmm(g, (minv * 2.0 - _eye(minv.shape[-1], minv.dtype, minv.device)).transpose(1, 2))  # G·Rᵀ
        return self._blocks_grad(blocks, keep, g.transpose(1, 2), self.m)

    def _a_w(self, minv, dtype):
        """``A′ = m·(R − I)ᵀ`` in ``dtype``: one subtraction, then the scale and the cast in one kernel."""
        d = (minv - _eye(minv.shape[-1], minv.dtype, minv.device)).transpose(1, 2)
        return torch.mul(d, 2.0 * self.m, out=torch.empty(d.shape, dtype=dtype, device=d.device))

    @staticmethod
    def _build(w, a_w):
        nb, b = a_w.shape[0], a_w.shape[-1]
        wb = w.reshape(nb, b, -1)
        with _full_precision(w):  # W′ in the weight's dtype (autocast would round an fp32 weight to bf16)
            return torch.baddbmm(wb, a_w, wb).reshape(w.shape)

    def __call__(self, w, b, blocks):
        """Differentiable form (``torch.compile``, the reference)."""
        minv = self._inverse(blocks, compute_dtype(w, blocks))[0]
        return self._build(w, self._delta(minv, self.m).transpose(1, 2).to(w.dtype)), b

    def forward_aux(self, w, b, blocks):
        keep = self._kept_inverse(blocks, compute_dtype(w, blocks))
        if oft_triton.kernels_usable(w, keep[0]):  # A′ formed in the build's launch: not kept (None in its place)
            return oft_triton.rotate_rows(w, keep[0], 2.0 * self.m), b, (None, *keep)
        a_w = self._a_w(keep[0], w.dtype)
        return self._build(w, a_w), b, (a_w, *keep)

    def recompute(self, keep, w, b, blocks):
        if keep[0] is None:
            return oft_triton.rotate_rows(w, keep[1], 2.0 * self.m), (keep, w)
        return self._build(w, keep[0]), (keep, w)

    def vjp(self, aux, theta, gw, gb, needs):
        if not needs[0]:
            return (None,)
        keep, w = aux
        minv = keep[1]
        nb, b = minv.shape[0], minv.shape[-1]
        with _full_precision(gw):
            ga = torch.bmm(gw.reshape(nb, b, -1), cast(w, gw.dtype).reshape(nb, b, -1).transpose(1, 2))  # ∂A′_k
        return (self._grad_from(theta[0], w, keep[1:], ga, gram=False),)


#: the narrowest input (``in_features``) on which :func:`_keep_output` takes a linear layer — the weight-gradient GEMM it
#: saves costs ≈ 2·in multiply-adds per output element, the pass over ∂y and y it adds ≈ 4 bytes: output-mode (IA)³'s
#: line (:data:`.ia3.KEEP_OUTPUT_MIN_IN`) by that same estimate, not measured for Diag-OFT (SDXL's layers all have 640
#: inputs or more; SD1.5's 320-input layers stay on the rebuilt op, not A/B-tested); ``LYCO_OFT_KEEP_OUTPUT_MIN_IN``
#: overrides it (A/B runs)
KEEP_OUTPUT_MIN_IN = 512


def _keep_output(x: torch.Tensor, spec, weight, bias, blocks, multiplier: float) -> bool:
    """Whether a Diag-OFT layer (no ``rescale``) takes :class:`_RotateKeepOutput`: ``LYCO_OFT_KEEP_OUTPUT``
    (:mod:`.graph_policy`, captured steps by default — a Triton launch per layer), a linear layer with at least
    :data:`KEEP_OUTPUT_MIN_IN` inputs at multiplier 1 (the recovery below needs the rotation itself), its weight and bias
    frozen, gradients on, not under ``torch.compile``, and on CUDA the kernel of :mod:`.oft_triton` usable for its block
    size (the CPU takes the torch form)."""
    if not graph_policy.wanted("LYCO_OFT_KEEP_OUTPUT"):
        return False
    if spec.kind != LINEAR or multiplier != 1.0 or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return False
    if spec.in_dim < graph_policy.env_int("LYCO_OFT_KEEP_OUTPUT_MIN_IN", KEEP_OUTPUT_MIN_IN, "input features"):
        return False
    if x.is_cuda:
        # the output's dtype decides (the kernels read ∂y and y): under autocast a norm's fp32 output (q/k/v, a GEGLU
        # projection) gives a bf16 GEMM — what the trainer runs; the benchmark's bf16 model gives it without autocast
        return oft_triton.usable(x, blocks.shape[-1], _compute_dtype(x))
    return True


class _RotateKeepOutput(torch.autograd.Function):
    """Diag-OFT (no ``rescale``, multiplier 1) on a linear layer, ``y = x·W′ᵀ + b`` with ``W′_k = R_kᵀ·W_k`` per block of
    b output rows (the rebuilt op's :class:`_DiagOFTBuild`), keeping the **output** y for backward instead of x.

    Per block ``y_k = z_k·R_k + b_k`` with ``z = x·Wᵀ``, so ``∂(R_kᵀ) = ∂y_kᵀ·z_k`` and, R being orthogonal,
    ``z_k = (y_k − b_k)·R_kᵀ``: ``∂(R_kᵀ) = G_k·R_kᵀ`` with the block Gram ``G_k = Σ_t ∂y_kᵀ·(y_k − b_k)`` (one pass over
    ∂y and y, :func:`.oft_triton.block_gram`), then the Cayley backward the rebuilt op runs
    (:meth:`_DiagOFTBuild._grad_from`: one launch of :func:`.oft_triton.cayley_grad`, or torch's). The rebuilt op gets the same ``∂A′ = ∂(R − I)ᵀ`` from the weight-gradient
    GEMM ``E = ∂yᵀ·x`` (the layer's forward multiply-adds again) and a weight-sized batched GEMM ``E_k·W_kᵀ``. ∂x as
    there, ``∂y·W′`` with W′ built again.

    Memory: the output is usually kept by what reads it (attention keeps q/k/v, a GEGLU its input), the input often is
    not (a feed-forward output layer's, a norm's output shared by q/k/v) — as output-mode (IA)³'s :class:`.ia3._KeepOutput`.

    Numerics (decision): the recovery is exact in exact arithmetic. y is rounded to the dtype, so ``y − b`` carries y's
    rounding (on a layer with a bias up to ``2⁻⁹·|b|`` where |y − b| is small); the forward used A′ rounded to the
    weight's dtype while the recovery uses the fp32 ``Rᵀ`` (off by that rounding of A′, which is ``R − I``-sized). Both
    enter the rotation's gradient only, never the forward or ∂x. Only at multiplier 1: ``I + m·(R − I)`` is orthogonal
    there only (and singular for some m, e.g. m = ½ with a half-turn block)."""

    @staticmethod
    def forward(ctx, x, weight, bias, blocks, build):
        w2, _, keep = build.forward_aux(weight, None, blocks)      # keep: (A′ in W's dtype or None, M, Q₀, n, s)
        cd = _compute_dtype(x)  # autocast's for an fp32 x: its own casts, W′ never made fp32 first
        y = F.linear(cast(x, cd), cast(w2, cd), cast(bias, cd))
        ctx.build, ctx.x_dtype = build, x.dtype
        ctx.save_for_backward(y, weight, bias, blocks, *keep)
        return y

    @staticmethod
    def backward(ctx, gy):
        y, weight, bias, blocks, *keep = ctx.saved_tensors          # keep: (A′ or None, M, Q₀, n, s)
        build, need = ctx.build, ctx.needs_input_grad
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = gblocks = None
        if need[3]:
            if g2.stride(-1) != 1:
                g2 = g2.contiguous()
            b = blocks.shape[-1]
            bv = cast(bias, y.dtype)
            if y.is_cuda:  # the partial sums go to the Cayley backward's launch, which sums them
                gram = oft_triton.block_gram(g2, y, bv, b, parts=True)
            else:
                gram = oft_triton.block_gram_torch(g2, y, bv, b)
            gblocks = build._grad_from(blocks, weight, keep[1:], gram, gram=True)   # ∂A′ = G·Rᵀ = ∂(Rᵀ) at m = 1
        if need[0]:
            w2 = build.recompute(keep, weight, None, blocks)[0]
            gx = cast(g2 @ cast(w2, gy.dtype), ctx.x_dtype)
        return gx, None, None, gblocks, None


class _BOFTBuild(_CayleyBuild):
    """BOFT (no ``rescale``) for :mod:`.rebuild` at multiplier ``m``: ``W′ = B_m(W)``, the butterfly applied
    to the output axis of W (stage i: ``u ← u + P_i⁻¹·blockdiag(Δ_i)·P_i·u``, ``Δ_i = m·(R_i − I)``) by
    :func:`butterfly_rows` — the rows in each stage's own order, W carried whole in fp32 (or wider) and
    rounded once at the end (the carried value's fp32 rounding is far below W′'s own). Backward by hand:

    * stages in reverse in their orders, from ``∂z′_{m−1}`` (``E = ∂L/∂W′`` gathered): ``∂Δ_i = ∂z′_i·z_iᵀ``,
      ``∂z_i = ∂z′_i + Δ_iᵀ·∂z′_i``, one gather to stage i−1's order (the stage inputs ``z_i`` recomputed,
      weight-sized, for this layer only);
    * then Cayley and the constraint as :class:`_CayleyBuild`."""

    @staticmethod
    def _loop(w, deltas, keep_inputs: bool):
        """(W′ rounded once to W's dtype, the stage inputs in blocks or None): :func:`butterfly_rows`."""
        curs = [] if keep_inputs else None
        with _full_precision(w):
            u = butterfly_rows(w, deltas, curs)
        return u.to(w.dtype), curs

    def __call__(self, w, b, blocks):
        """Differentiable form (``torch.compile``, the reference)."""
        minv = self._inverse(blocks, compute_dtype(w, blocks))[0]
        return self._loop(w, self._delta(minv, self.m), False)[0], b

    def forward_aux(self, w, b, blocks):
        keep = self._kept_inverse(blocks, compute_dtype(w, blocks))
        return self._loop(w, self._delta(keep[0], self.m), False)[0], b, keep  # blocks-sized; W′ rebuilt in backward

    def recompute(self, keep, w, b, blocks):
        deltas = self._delta(keep[0], self.m)
        w2, curs = self._loop(w, deltas, True)
        return w2, (keep, curs, deltas)

    def vjp(self, aux, theta, gw, gb, needs):
        """Stages in reverse in their own orders: ``∂z′_i`` → ``∂Δ_i = ∂z′_i·z_iᵀ``, ``∂z_i = ∂z′_i + Δ_iᵀ·∂z′_i``
        (one batched GEMM each), one gather back to stage i−1's order."""
        keep, curs, deltas = aux
        blocks = theta[0]
        if not needs[0]:
            return (None,)
        mm, nb, bs, _ = deltas.shape
        out = nb * bs
        _, ginv = _chain(out, bs, mm, gw.device)
        gdel = torch.empty_like(deltas)
        with _full_precision(deltas):
            gz = gw.reshape(out, -1).index_select(0, ginv[mm]).to(deltas.dtype)   # ∂z′_{m−1}
            for i in reversed(range(mm)):
                gzb = gz.view(nb, bs, -1)
                torch.bmm(gzb, curs[i].transpose(1, 2), out=gdel[i])
                if i:
                    gz = torch.baddbmm(gzb, deltas[i].transpose(1, 2), gzb).view(out, -1).index_select(0, ginv[i])
        return (self._blocks_grad(blocks, keep, gdel, self.m),)


@register
class BOFT(_OFTBase):
    name = "boft"
    blocks_ndim = 4
    linear_in_multiplier = False

    def create(self, spec, opts, weight=None, generator=None) -> Tensors:
        b, nb = power2factorization(spec.out_dim, int(opts["rank"]))  # raises if impossible
        stages = int(nb).bit_length()  # log2(nb) + 1
        return self._new_tensors((stages, nb, b, b), spec, opts)

    def _delta_rows_last(self, t, v: torch.Tensor, multiplier: float) -> torch.Tensor:
        """``rescale_m ⊙ B_m(v) − v`` for channel-last ``v``."""
        d = butterfly_delta(v, self.rotations(t).to(v.dtype), multiplier)
        rs = _rescale_vec(t, v.dtype)
        if rs is not None:
            rs_m = 1 + multiplier * (rs - 1)
            d = rs_m * d + (rs_m - 1) * v
        return d

    def _check(self, t, spec):
        super()._check(t, spec)
        m, nb, b, _ = t["oft_blocks"].shape
        if b % 2 or nb & (nb - 1) or m > int(nb).bit_length():
            raise ShapeMismatch("(boft)", tuple(t["oft_blocks"].shape), (spec.out_dim,), key="oft_blocks",
                                detail="BOFT needs an even block size, a power-of-two block count "
                                       "and at most log2(blocks)+1 stages")

    def weight_delta_at(self, t, spec, weight, multiplier: float) -> torch.Tensor:
        self._check(t, spec)
        w = weight.to(compute_dtype(weight, t["oft_blocks"]))
        return self._delta_rows_last(t, w.movedim(0, -1), multiplier).movedim(-1, 0)

    def delta_weight(self, t, spec, weight=None):
        if weight is None:
            raise ValueError("BOFT needs the base weight")
        return self.weight_delta_at(t, spec, weight, 1.0)

    def merged(self, t, spec, weight, bias, multiplier):
        # per-stage interpolation: not W + m·ΔW (see module doc); the bias is never rotated
        return weight + self.weight_delta_at(t, spec, weight, multiplier).to(weight.dtype), bias

    def forward_delta(self, x, t, spec, weight, bias, base_out, multiplier: float = 1.0):
        """Δy at ``multiplier`` (default 1): ``op(x, merged(m) − W)`` without building it."""
        self._check(t, spec)
        y = base_out if bias is None else base_out - _channel(bias, spec, base_out)
        axis = 1 if spec.is_conv else -1
        v = _rows_last(y, axis).to(compute_dtype(y, t["oft_blocks"]))
        d = self._delta_rows_last(t, v, multiplier)
        return d.movedim(-1, axis).to(x.dtype) if axis == 1 else d.to(x.dtype)

    def _own_build(self, m: float, kappa: float | None):
        return _BOFTBuild(m, kappa)

    def prefers_rebuild_for(self, t, spec):
        # Decision (GPU run 8, H200, SD1.5 b8, ``lin`` layers): the rebuilt op (butterfly applied to the
        # weight rows, W′ rebuilt in backward) keeps x only, where the bypass keeps every stage's
        # activations on the stage-loop layers and f(x) − b on the dense-K ones: peak 8.84 vs 20.13 GiB
        # (PEFT 13.35), one-graph device time 406.8 vs 396.8 ms; eager it was slower then (799 vs 633 ms,
        # backward through nested autograd). With its own backward, the row-order butterfly and the batched
        # Cayley inverse (runs 18–24) it is faster than both peers eagerly too: H200 343–365 ms vs LyCORIS
        # 719–739 and PEFT 595–707, graph 196–203 ms; H100 731 vs PEFT 1386. ``mode = "bypass"`` keeps the
        # delta path.
        return rebuild_supports(spec)

    #: the dense form K = B_m − I (out×out) is used when out ≤ this and the call has at least
    #: ``DENSE_TOKENS_PER_OUT``·out positions: building K costs ∝ out², the stage loop ∝ positions·out
    DENSE_MAX_OUT = 4096
    DENSE_TOKENS_PER_OUT = 2

    def forward_accumulate(self, acc, x, t, spec, weight, bias, base_out, multiplier, inplace=False):
        """In the activations' dtype (rotations and R − I in fp32, then cast). Many positions:
        ``acc + (f(x) − b)·K`` with the dense K = (B_m − I) built in fp32 (one GEMM, add fused);
        few: the stage loop on the activations, then one add."""
        if "rescale" in t or acc.dtype != base_out.dtype or (spec.is_conv and base_out.dim() < 3):
            return super().forward_accumulate(acc, x, t, spec, weight, bias, base_out, multiplier, inplace)
        self._check(t, spec)
        rots = self.rotations(t)
        mm, nb, b, _ = rots.shape
        out = nb * b
        y = base_out if bias is None else base_out - _channel(bias, spec, base_out)
        positions = y.numel() // out
        if out <= self.DENSE_MAX_OUT and positions >= self.DENSE_TOKENS_PER_OUT * out:
            eye = torch.eye(out, dtype=rots.dtype, device=rots.device)  # not cached: up to 64 MiB
            k = butterfly_delta(eye, rots, multiplier).to(acc.dtype)      # d = v @ K for channel-last v
            if spec.is_conv:
                return accumulate_conv1x1(acc, y, k.t())
            return accumulate_linear(acc, y, k.t(), 1.0, False)
        eye = _eye(b, rots.dtype, rots.device)
        deltas = (multiplier * (rots - eye)).to(acc.dtype)
        axis = 1 if spec.is_conv else -1
        d = _butterfly_apply(_rows_last(y, axis), deltas)
        return acc + (d.movedim(-1, axis) if axis == 1 else d)


def _channel(bias: torch.Tensor, spec, y: torch.Tensor) -> torch.Tensor:
    return channel_view(bias.to(y.dtype), spec, y)

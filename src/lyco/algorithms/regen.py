"""An op's input regenerated in backward from what its producer keeps anyway, instead of kept itself.

A low-rank adapter's ``∂D = s·(∂y·U)ᵀ·x`` needs the layer's input x in backward, so the adapter keeps x — and a
frozen layer keeps nothing (its ∂x needs only W). Where x is the fresh output of an elementwise op whose own backward
keeps the tensors x is computed from, keeping those instead costs no memory at all — they live until that op's
backward anyway, which comes after the layer's — and x is one elementwise pass away. The case that matters: a
transformer block's feed-forward ``Linear(a ⊙ gelu(g))`` (diffusers' GEGLU → ``ff.net.2``; CLIP-L's quick-GELU,
``t ⊙ sigmoid(1.702·t)`` → ``fc2``): the mul keeps ``a`` and ``gelu(g)``, the adapter kept their product besides —
the widest tensor of the block (4 × the model width). GELU and SiLU outputs (SDXL's OpenCLIP ``fc2``) likewise:
their op keeps its input.

The recomputation runs the producer's own op on the same tensors, so x comes back bit for bit (an elementwise
kernel's result does not depend on the launch) — the gradients are the ones the kept x gives (the CPU tests; on the
GPU ``benchmarks/regen_check.py``, runs 178, 182 (captured-steps paths) and 183 (eager): every adapter gradient of
an SD1.5-config UNet step equal).

What it trades (H100, captured steps, the step's peak and time with it on / off, PEFT's peak in brackets; runs
179–182, benchmarks/NOTES.md change 117): SD1.5 b8 LoRA 8.18 / 8.79 GiB [8.75] for 73.9 / 72.8 ms, LoCon 8.30 / 8.92
[8.88] for 73.9 / 72.7, LoHa 8.59 / 9.20 [10.32] for 76.3 / 75.3; SDXL b4 LoRA 27.47 / 30.60 [30.53] for 203.8 /
198.6–198.9, LoHa 28.71 / 31.84 [35.14] for 214.3 / 209.8; SDXL b1 LoRA 10.78 / 11.56 [11.49] for 77.8 / 76.4 — 6–10 %
of the peak for 1.2–2.6 % of the time: the extra elementwise pass (read a and b, write x) costs the backward's
bandwidth, built ahead on another stream or not (run 182). In captured steps a product's x is no longer written at
all since change 118: the bypass op's ∂D reads a and b in one Triton kernel (:mod:`.regen_triton`,
``LYCO_REGEN_KERNEL``; :func:`.lowrank._regen_operands`), which leaves 0.5–1.2 % (runs 186–187: SD1.5 b8 LoRA 73.4–73.5
ms, SDXL b4 201.2–201.4, SDXL b1 77.1; kept inputs 72.8, 198.6–198.9 and 76.4 in session 25). Eager steps (run 183):
the same peaks (SDXL b4 LoRA 27.44 / 30.57 GiB), their times within the eager noise — they wait on the host. On by
default, captured and eager: the memory is what an SDXL user runs out of; ``LYCO_INPUT_REGEN=0`` keeps the inputs
for the last 1 % of speed.

**A layer norm's output** (change 119; :func:`_find_norm`): q/k/v's input (norm1), ``attn2.to_q``'s (norm2) and the
GEGLU projection's (norm3) in every transformer block, and CLIP's q/k/v and ``fc1`` — the norm keeps its input and
the mean and 1/σ of each row, so x is ``(u − μ)·(1/σ)·γ + β`` away: rebuilt within one rounding of x (on the GPU
equal, run 188: torch's rebuild gave every gradient bit for bit), by default in captured steps only
(``LYCO_NORM_REGEN``, ``graph``; ``1`` takes it into eager steps' delta path too, x rebuilt by torch there), where the
bypass op's and the shared-input op's ∂D read the norm's input in one kernel —
the bytes x would have cost, plus ``(u − μ)·(1/σ)·γ + β`` in registers. H100, captured steps with it on / off (run
192): SD1.5 b8 LoRA **7.659** / 8.178 GiB (floor 7.625, PEFT 8.750) for 73.32–73.39 / 73.27 ms, LoCon 7.787 / 8.303 for
73.19 / 73.05; SDXL b4 LoRA **25.131** / 27.470 (PEFT 30.53) for 202.64 / 202.04; SDXL b1 LoRA 10.188 / 10.775 for
77.29 / 76.93 — 5–9 % of the peak for 0.1–0.5 % of the time.

**A GEGLU's backward taken into the consumer's** (change 120; :func:`find_geglu`, ``LYCO_GEGLU_FUSE``, captured steps
by default): where x is ``a ⊙ gelu(g)`` of one projection's two halves, the bypass op takes that projection's output
as its input in x's place and runs the mul's, GELU's and the split's backward itself, with ∂D, in one Triton pass
(:func:`.regen_triton.geglu_backward`) — gelu(g) leaves the peak with the nodes that kept it. H100, captured steps on /
off (runs 197–198): SD1.5 b8 LoRA 69.98 / 73.26 ms at 6.99 / 7.66 GiB (PEFT 88.37 ms, 8.75 GiB), SDXL b4 187.6 / 201.2
ms at 22.0 / 25.1 GiB, SDXL b1 73.9 / 77.7.

Two users: the bypass op (:mod:`.lowrank`, captured steps) and, in eager steps, LoRA's down on the delta path
(:func:`linear`: the layer's ``F.linear(x, D)`` kept x for ∂D as autograd saves it).

(and the shared-input op, :mod:`.lowrank_shared`, for q/k/v's common input). When it applies (:func:`find`, the
caller having checked its own conditions): ``LYCO_INPUT_REGEN``
(:mod:`.graph_policy`, ``1`` — everywhere — by default); not under ``torch.compile``; x (or the tensor x is a full
contiguous view of, a 2-D reshape of it) is an unmodified output (version 0) of ``a * b`` with both operands kept
and of x's shape, of ``gelu`` or of ``silu``; no saved-tensor hooks are active (under
``torch.utils.checkpoint``'s non-reentrant form, or activation offloading, unpacking a producer's tensor could run
the hooks' machinery: the input is kept as before). A producer's tensor that was modified in place since raises on
unpacking: the input is kept then too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import graph_policy

_top_hooks = getattr(getattr(torch._C, "_autograd", None), "_top_saved_tensors_default_hooks", None)


def _hooks_active() -> bool:
    if _top_hooks is None:  # this torch cannot say: never regenerate
        return True
    return _top_hooks(False) is not None


class Regen:
    """How to rebuild an input: ``kind`` (``mul``, ``gelu``, ``silu``, ``layernorm``, ``geglu``), its parameter (GELU's
    ``approximate``; a layer norm's ``(has weight, has bias)``), the shape the consumer saw and the count of tensors
    it takes from the saved ones (:func:`find`)."""

    __slots__ = ("kind", "param", "shape", "n")

    def __init__(self, kind: str, param, shape: torch.Size, n: int):
        self.kind, self.param, self.shape, self.n = kind, param, shape, n

    def value(self, tensors) -> torch.Tensor:
        """x, from the tensors :func:`find` returned (as saved and unpacked)."""
        if self.kind == "mul":
            out = torch.mul(tensors[0], tensors[1])
        elif self.kind == "layernorm":
            out = _layer_norm_value(tensors, *self.param)
        elif self.kind == "gelu":
            out = F.gelu(tensors[0], approximate=self.param)
        elif self.kind == "geglu":  # p = [a | g]: a ⊙ gelu(g) (find_geglu)
            a, g = tensors[0].chunk(2, -1)
            out = a * F.gelu(g)
        else:
            out = F.silu(tensors[0])
        return out.reshape(self.shape)  # the elementwise result keeps its operands' layout: a copy if not x's


def _producer(x: torch.Tensor) -> torch.Tensor | None:
    """The tensor whose grad_fn made x: x itself, or the base x is a whole contiguous view of (a layer host's 2-D
    rows of a ``(batch, tokens, width)`` activation)."""
    if x.grad_fn is None or x._version != 0:
        return None
    base = x._base
    if base is None:
        return x
    if (base.grad_fn is None or not x.is_contiguous() or not base.is_contiguous() or base.numel() != x.numel()
            or base.data_ptr() != x.data_ptr()):
        return None
    return base


def _layer_norm_value(tensors, has_w: bool, has_b: bool) -> torch.Tensor:
    """A last-dimension layer norm's output from its input and the mean and 1/σ it saved: ``(u − μ)·(1/σ)·γ + β`` in
    fp32 (or float64), rounded to the input's dtype once."""
    u, mean, rstd = tensors[:3]
    dt = torch.promote_types(u.dtype, torch.float32)
    out = (u.to(dt) - mean.to(dt)) * rstd.to(dt)
    if has_w:
        out = out * tensors[3].to(dt)
    if has_b:
        out = out + tensors[3 + has_w].to(dt)
    return out.to(u.dtype)


_KINDS = ("MulBackward0", "GeluBackward0", "SiluBackward0")
_NORM = "NativeLayerNormBackward0"


def find(x: torch.Tensor, norm: bool = False):
    """``(Regen, tensors)`` where x can be rebuilt from tensors its producer keeps (module doc), else None. The
    cheap refusals first: it is asked on every adapted linear layer's input of an eager step. Under ``torch.compile``
    never (grad_fn is not traceable: a graph break per layer). ``norm``: the caller takes a layer norm's output too
    (``LYCO_NORM_REGEN`` permitting) — rebuilt within one rounding of x, not bit for bit (:func:`_find_norm`)."""
    if torch.compiler.is_compiling():
        return None
    p = _producer(x)
    if p is None:
        return None
    fn = p.grad_fn
    name = fn.name()
    if name == _NORM:
        return _find_norm(x, p, fn) if norm else None
    if name not in _KINDS or not graph_policy.wanted("LYCO_INPUT_REGEN", "1") or _hooks_active():
        return None
    try:  # unpacking raises for a kept tensor modified in place since, or freed: x is kept then
        if name == "MulBackward0":
            kind, param, kept = "mul", None, (fn._saved_self, fn._saved_other)
        elif name == "GeluBackward0":
            kind, param, kept = "gelu", fn._saved_approximate, (fn._saved_self,)
        else:
            kind, param, kept = "silu", None, (fn._saved_self,)
    except RuntimeError:
        return None
    if any(t is None or t.shape != p.shape for t in kept):  # not kept (no gradient there), or broadcast
        return None
    return Regen(kind, param, x.shape, len(kept)), kept


class _RegenLinear(torch.autograd.Function):
    """``F.linear(x, w)`` (no bias) keeping the tensors x is rebuilt from instead of x: its backward is autograd's
    for the same product — ``∂x = ∂h·w``, ``∂w = ∂hᵀ·x`` over x's rows — with x regenerated for ∂w. The kept
    tensors come in detached (no graph edge to them; their version counters stay shared, so an in-place change
    since raises on unpacking, as autograd's own saved x would). Once differentiable, as the bypass op: a
    second-order gradient would need the rebuilt x's graph to a and b, which it does not carry
    (``LYCO_INPUT_REGEN=0`` keeps ``F.linear``'s double backward)."""

    @staticmethod
    def forward(ctx, x, w, rg, *kept):
        ctx.rg, ctx.xdt = rg, x.dtype
        ctx.save_for_backward(w, *kept)
        return F.linear(x, w)  # under autocast in its dtype, as the layer's own F.linear

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh):
        w, *kept = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        g2 = gh.reshape(-1, gh.shape[-1])
        cd = g2.dtype  # the forward's compute dtype: the inputs' own, or autocast's (then each gradient goes back
        gx = gw = None  # in its input's dtype, as autocast's casts would send it)
        if need_x:
            gx = g2.mm(w.to(cd)).view(*gh.shape[:-1], w.shape[1]).to(ctx.xdt)
        if need_w:
            x = ctx.rg.value(kept).to(cd)
            gw = g2.t().mm(x.reshape(-1, x.shape[-1])).to(w.dtype)  # as autograd's mm backward lays it out
        return (gx, gw, None) + (None,) * len(kept)


#: a layer norm's output of fewer elements than this is kept, not regenerated (:func:`norm_regen_min`)
NORM_REGEN_MIN = 1 << 21


def norm_regen_min() -> int:
    """The fewest elements of a layer norm's output that :func:`_find_norm` regenerates (``LYCO_NORM_REGEN_MIN``,
    default :data:`NORM_REGEN_MIN` = 2²¹, 4 MiB in bf16; ``0``: every size). A shape rule like the bypass op's
    rows ≥ c·channels: the rebuild trades one kept x for its read in the ∂D kernel, and where x is small the memory it
    saves is small beside the step's peak while the kernel's two launches over few rows cost what cuBLAS's GEMM on the
    kept x does not. At 2²¹ the b1 steps keep their norms' outputs but SDXL's 64×64 level's (4096 × 640); the large
    batches regenerate all but SD1.5 b8's 8×8 level's (512 × 1280). Measured (H100, LoRA, captured steps, run 242,
    this rule against every size regenerated, A/B/A/B): SDXL b1 **72.76 / 73.22 / 72.78 ms**, graph peak 9.846
    against 9.407 GiB (PEFT 11.49; run 192 had 76.93 against 77.29 with no norm regenerated); SD1.5 b1 22.56 / 22.57 /
    22.58 / 22.60 (no difference beyond the noise; peak 2.470 against 2.404, PEFT 2.569); SD1.5 b8 69.59, peak 6.993
    (unchanged). Where memory is short, ``0`` regenerates every size; at b8 and SDXL b4 the rebuild is what keeps the
    peak under PEFT's (run 188: SD1.5 b8 8.178 → 7.659 GiB, SDXL b4 27.47 → 25.131)."""
    return graph_policy.env_int("LYCO_NORM_REGEN_MIN", NORM_REGEN_MIN,
                                "the fewest elements of a layer norm's output that is regenerated")


def _find_norm(x: torch.Tensor, p: torch.Tensor, fn):
    """A layer norm over x's last dimension (``F.layer_norm``, ``nn.LayerNorm``): its node keeps the input, the mean
    and 1/σ per row (fp32 on CUDA) and its weight and bias — what x is made of, no eps needed. Rebuilt by
    :func:`_layer_norm_value` (or the bypass op's kernel, :mod:`.regen_triton`), x comes back as ``(u − μ)·(1/σ)·γ + β``
    rounded once — torch's kernels compute the same expression in their own order (and on the CPU keep a bf16
    input's μ and 1/σ in bf16), so an element may differ from the kept x by one rounding of x's dtype (decision: the
    kept x is itself one rounding of the exact norm; ∂D from either is as exact as x's dtype allows). Only under
    ``LYCO_NORM_REGEN`` (:mod:`.graph_policy`, captured steps by default: there the bypass op's ∂D reads the norm's
    input in one kernel, the bytes x would have cost; elsewhere — ``1`` — the rebuild is two passes more)."""
    if (not graph_policy.wanted("LYCO_INPUT_REGEN", "1") or not graph_policy.wanted("LYCO_NORM_REGEN")
            or _hooks_active() or x.numel() < norm_regen_min()):
        return None
    try:
        shape = tuple(fn._saved_normalized_shape)
        u, mean, rstd = fn._saved_input, fn._saved_result1, fn._saved_result2
        w, b = fn._saved_weight, fn._saved_bias
    except RuntimeError:
        return None
    if (len(shape) != 1 or u is None or u.shape != p.shape or shape[0] != p.shape[-1] or mean is None or rstd is None
            or mean.numel() * shape[0] != p.numel()):
        return None
    kept = (u, mean, rstd) + tuple(t for t in (w, b) if t is not None)
    return Regen("layernorm", (w is not None, b is not None), x.shape, len(kept)), kept


def find_geglu(x: torch.Tensor) -> torch.Tensor | None:
    """The GEGLU projection's output ``p = [a | g]`` where x is ``a ⊙ gelu(g)`` of its two halves (diffusers' GEGLU:
    ``proj(h).chunk(2, -1)``, then ``a * F.gelu(g)``, before ``ff.net.2``), else None — for the bypass op to take p as
    its input in x's place (:func:`.lowrank.bypass_op`, change 120): its backward then runs the mul's, GELU's and the
    split's backward itself, in the kernel that forms ∂D (:func:`.regen_triton.geglu_backward`), and autograd never
    reaches those three nodes from this consumer. What it changes:

    * **Time**: one pass reads a, g and ∂x and writes ∂p, where torch's three nodes read ∂x twice and write ∂a, ∂b,
      ∂g and the concatenation (a, b, g read besides), and change 118's ∂D reads a and b once more.
    * **Memory**: gelu(g) — kept by the mul for its backward, a tensor of x's size per block — is freed with the
      forward's nodes, which nothing references once x is gone; p was kept anyway (the halves are views of it).
    * **Numerics (decision)**: ∂p carries each of torch's roundings in the same order (gelu(g), then ∂b = ∂x·a,
      then ∂g = ∂b·GELU′(g); CUDA's ``erff``/``expf`` through libdevice), so it matches torch's chain but for the
      last bit of some fp32 intermediates (FMA contraction or erf/exp, not isolated) — within one rounding of p's
      dtype where it differs
      (``benchmarks/experiments/geglu_bwd_bench.py`` counts those on the GPU: 0.3 % of the elements, at most 3.8e-6 of
      the largest entry, runs 195–196; ``benchmarks/regen_check.py`` checks the step's gradients against fp32).

    Conditions: ``LYCO_GEGLU_FUSE`` (:mod:`.graph_policy`, captured steps by default) and :func:`find`'s —
    ``LYCO_INPUT_REGEN``, not compiling, x (or the base it is a whole view of) an unmodified output of a mul with
    both operands kept, no saved-tensor hooks; the mul's inputs the two outputs of one split (``chunk(2, -1)``:
    halves of one contiguous tensor, a first) with g through an exact (``approximate="none"``) GELU; no tensor hook
    and no ``retain_grad`` on x or its base (they would not see a gradient). Another consumer of x, a, g or gelu(g)
    still sends its gradient through torch's nodes — autograd sums both into p's."""
    if (torch.compiler.is_compiling() or not graph_policy.wanted("LYCO_GEGLU_FUSE")
            or not graph_policy.wanted("LYCO_INPUT_REGEN", "1")):
        return None
    prod = _producer(x)
    if prod is None or prod.grad_fn.name() != "MulBackward0" or _hooks_active():
        return None
    if any(t._backward_hooks or t.retains_grad for t in {id(x): x, id(prod): prod}.values()):
        return None
    mul = prod.grad_fn
    (split, ia), (gelu, ib) = mul.next_functions
    if (split is None or gelu is None or split.name() != "SplitBackward0" or gelu.name() != "GeluBackward0"
            or ia != 0 or ib != 0 or gelu.next_functions[0] != (split, 1)):
        return None
    try:
        a, b, g, approx = mul._saved_self, mul._saved_other, gelu._saved_self, gelu._saved_approximate
    except RuntimeError:
        return None
    p = None if a is None else a._base
    if (approx != "none" or b is None or g is None or p is None or g._base is not p or not p.requires_grad
            or not p.is_contiguous()):
        return None
    k = a.shape[-1]
    if (a.shape != prod.shape or g.shape != a.shape or b.shape != a.shape or p.shape[-1] != 2 * k
            or p.numel() != 2 * a.numel() or a.data_ptr() != p.data_ptr() or a.stride() != g.stride()
            or g.data_ptr() != p.data_ptr() + k * p.element_size()):
        return None
    return p


def geglu_input(x: torch.Tensor, r: int = 1) -> torch.Tensor | None:
    """:func:`find_geglu`'s p where x takes a gradient and :func:`.regen_triton.geglu_usable` holds for p at rank r
    (without the kernel the torch form of the same backward only adds GELU's recomputation), else None: what an op
    on x takes as its input in x's place (the bypass op, :func:`.lowrank._geglu_input`; output-mode (IA)³'s
    :class:`.ia3._KeepOutput`)."""
    if not x.requires_grad:
        return None
    p = find_geglu(x)
    if p is None:
        return None
    from . import regen_triton
    return p if regen_triton.geglu_usable(p, r) else None


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` for an adapter's down on the delta path, x regenerated in backward where :func:`find`
    allows and w takes a gradient (else x is not kept anyway). A layer norm's output too where ``LYCO_NORM_REGEN``
    says so — not by default outside graph steps, where an eager step's gradients stay bit for bit those of the kept
    input; ``1`` takes it everywhere (the memory for x's rebuild by torch in backward: two passes more)."""
    if not (w.requires_grad and torch.is_grad_enabled()):
        return F.linear(x, w)
    found = find(x, norm=True)
    if found is None:
        return F.linear(x, w)
    rg, kept = found
    return _RegenLinear.apply(x, w, rg, *(t.detach() for t in kept))

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
``LYCO_REGEN_KERNEL``; :func:`.lowrank._regen_pair`), which leaves 0.5–1.2 % (runs 186–187: SD1.5 b8 LoRA 73.4–73.5
ms, SDXL b4 201.2–201.4, SDXL b1 77.1; kept inputs 72.8, 198.6–198.9 and 76.4 in session 25). Eager steps (run 183):
the same peaks (SDXL b4 LoRA 27.44 / 30.57 GiB), their times within the eager noise — they wait on the host. On by
default, captured and eager: the memory is what an SDXL user runs out of; ``LYCO_INPUT_REGEN=0`` keeps the inputs
for the last 1 % of speed.

Two users: the bypass op (:mod:`.lowrank`, captured steps) and, in eager steps, LoRA's down on the delta path
(:func:`linear`: the layer's ``F.linear(x, D)`` kept x for ∂D as autograd saves it).

When it applies (:func:`find`, the caller having checked its own conditions): ``LYCO_INPUT_REGEN``
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
    """How to rebuild an input: ``kind`` (``mul``, ``gelu``, ``silu``), its parameter (GELU's ``approximate``),
    the shape the consumer saw and the count of tensors it takes from the saved ones (:func:`find`)."""

    __slots__ = ("kind", "param", "shape", "n")

    def __init__(self, kind: str, param, shape: torch.Size, n: int):
        self.kind, self.param, self.shape, self.n = kind, param, shape, n

    def value(self, tensors) -> torch.Tensor:
        """x, from the tensors :func:`find` returned (as saved and unpacked)."""
        if self.kind == "mul":
            out = torch.mul(tensors[0], tensors[1])
        elif self.kind == "gelu":
            out = F.gelu(tensors[0], approximate=self.param)
        else:
            out = F.silu(tensors[0])
        return out.view(self.shape)


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


_KINDS = ("MulBackward0", "GeluBackward0", "SiluBackward0")


def find(x: torch.Tensor):
    """``(Regen, tensors)`` where x can be rebuilt from tensors its producer keeps (module doc), else None. The
    cheap refusals first: it is asked on every adapted linear layer's input of an eager step. Under ``torch.compile``
    never (grad_fn is not traceable: a graph break per layer)."""
    if torch.compiler.is_compiling():
        return None
    p = _producer(x)
    if p is None:
        return None
    fn = p.grad_fn
    name = fn.name()
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


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` for an adapter's down on the delta path, x regenerated in backward where :func:`find`
    allows and w takes a gradient (else x is not kept anyway)."""
    if not (w.requires_grad and torch.is_grad_enabled()):
        return F.linear(x, w)
    found = find(x)
    if found is None:
        return F.linear(x, w)
    rg, kept = found
    return _RegenLinear.apply(x, w, rg, *(t.detach() for t in kept))

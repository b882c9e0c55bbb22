"""One batched build per forward pass of the small factor products many layers of one shape rebuild every step —
LoKr's up ``U = kron(W1, A)`` of its low-rank form (:mod:`.lokr`) — differentiable, with one batched backward.

Why (issue 7): each LoKr layer on its LoRA form builds U forward and reduces ∂U to ∂W1, ∂A backward — two kernel
launches per layer and step even as Triton kernels (:mod:`.factor_triton`); GPU run 81's profile of a captured
SD1.5 b8 step had them at 1.43 ms over 242 launches each way (1.6 µs forward, 4.3 backward: launch slots, not
work). Here the layers of one shape share one stack of their factors, one build and, backward, one stack of their
∂U's and one reduction: five launches per shape group instead of two per layer.

Which layers form a batch (the bookkeeping of :class:`.oft._InverseBatch`, differentiable here): a layer's call is
served from the batch while its entry is unused, its factors' version counters have not moved (an optimizer
step) and no backward pass has run through the batch (a layer checked alone, forward and backward, before the
next one is called). The first layer of a new forward pass finds its entry used and recomputes the batch over
the layers called since its own previous call — the previous pass's — and the rest of the pass is served from
it; a layer never called before computes its own U and joins at the next recomputation. Inside a CUDA graph
capture the first call always recomputes (a replay runs no host code, so the batch must be part of the graph).
Gradients: the batch is one autograd node with one output per member; its backward runs once every member's ∂U is
in (at the end of the backward pass) and gives each member the gradients of its own factors — None for a member
this pass did not use, so an optimizer skips it as without the batch.

Not batched (each layer builds its own U, as before): gradients off, under ``torch.compile``, inside
saved-tensor hooks (activation checkpointing's forward, offloading) and inside a backward pass (checkpointing's
recomputation) — a checkpointed region must save the same tensors when it is recomputed, and a batch computed in
one of its two runs would not be in the other — factors that do not require gradients, and FSDP's parameters (it
frees their storage between its units' calls: reading another unit's factors segfaulted in tests/train/test_ddp.py;
a member whose storage is freed is also left out of a batch). The values are the
per-layer build's: the forward products are exact in fp32 and rounded once either way; backward sums in fp32.
``LYCO_FACTOR_BATCH=0`` turns the batch off (a diagnostic switch for A/B runs).
"""

from __future__ import annotations

import os
import weakref

import torch

from . import factor_triton

#: the saved-tensor hooks in force (None when none; a function missing from this torch: treated as "in force")
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda ignore_tracing: True)


_ON = os.environ.get("LYCO_FACTOR_BATCH", "1") != "0"


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _backed(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage still holds its elements — a sharding wrapper may have freed it (resized to 0) since
    the layer's call; reading it then would read freed memory."""
    need = (t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
    return t.untyped_storage().nbytes() >= need


def eligible(*factors: torch.Tensor) -> bool:
    """Whether a call with these factors may be served from (or start) a batch (module doc)."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling() and _ON
            and all(f.requires_grad and not getattr(f, "_fsdp_flattened", False) for f in factors)
            and _top_hooks(False) is None
            and torch._C._current_graph_task_id() == -1)


def _kron_build(w1: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``U[b] = kron(W1[b], A[b])`` for stacked ``W1 (n, ol, im)``, ``A (n, ok, r)`` → ``(n, ol·ok, im·r)``."""
    n, ol, im = w1.shape
    _, ok, r = a.shape
    if factor_triton.usable(a, factor_triton.kron_inner(im, r)):
        return factor_triton.kron_forward_batched(w1, a)
    return torch.mul(w1.view(n, ol, 1, im, 1), a.view(n, 1, ok, 1, r)).view(n, ol * ok, im * r)


def _kron_grads(w1: torch.Tensor, a: torch.Tensor, gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂W1, ∂A)`` stacked, from the stacked ``∂U (n, ol·ok, im·r)``."""
    n, ol, im = w1.shape
    _, ok, r = a.shape
    if factor_triton.usable(a, factor_triton.kron_inner(im, r)):
        return factor_triton.kron_backward_batched(w1, a, gu)
    g5 = gu.view(n, ol, ok, im, r)
    # ∂W1[b,i,j] = Σ_kρ ∂U[b,i,k,j,ρ]·A[b,k,ρ]; ∂A[b,k,ρ] = Σ_ij ∂U[b,i,k,j,ρ]·W1[b,i,j]
    # (GEMMs: accumulated in fp32)
    gp = g5.permute(0, 1, 3, 2, 4).reshape(n, ol * im, ok * r)  # one copy, read by both products
    gw1 = torch.matmul(gp, a.reshape(n, ok * r, 1)).view(n, ol, im)
    ga = torch.matmul(w1.reshape(n, 1, ol * im), gp)
    return gw1, ga.view(n, ok, r)


class _KronBatch(torch.autograd.Function):
    """Inputs ``(token, dt, n, W1_1…W1_n, A_1…A_n)``; outputs ``U_1…U_n`` in ``dt`` (views of one stacked result).
    ``token[0]`` turns true when the backward has run (the batch is spent)."""

    @staticmethod
    def forward(ctx, token, dt, n, *factors):
        ctx.set_materialize_grads(False)
        ctx.token = token
        w1s, as_ = factors[:n], factors[n:]
        w1 = torch.stack(w1s)
        a = torch.stack(as_)
        w1c = w1 if w1.dtype == dt else w1.to(dt)
        ac = a if a.dtype == dt else a.to(dt)
        ctx.save_for_backward(w1c, ac)
        ctx.n, ctx.dtypes = n, (w1s[0].dtype, as_[0].dtype)
        return tuple(_kron_build(w1c, ac).unbind(0))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gus):
        w1, a = ctx.saved_tensors
        ctx.token[0] = True  # this node's saved tensors are gone now: its outputs must not be served again
        used = [g is not None for g in gus]
        if not any(used):
            return (None, None, None) + (None,) * (2 * ctx.n)
        like = next(g for g in gus if g is not None)
        zero = None
        rows = []
        for g in gus:
            if g is None:
                zero = torch.zeros_like(like) if zero is None else zero
                g = zero
            rows.append(g)
        gw1, ga = _kron_grads(w1, a, torch.stack(rows).to(w1.dtype))
        gw1 = gw1 if gw1.dtype == ctx.dtypes[0] else gw1.to(ctx.dtypes[0])
        ga = ga if ga.dtype == ctx.dtypes[1] else ga.to(ctx.dtypes[1])
        g1 = [g if u else None for g, u in zip(gw1.unbind(0), used)]
        g2 = [g if u else None for g, u in zip(ga.unbind(0), used)]
        return (None, None, None, *g1, *g2)


class _Batch:
    """The members of one key (shapes, dtypes, device) and their last batch (module doc)."""

    def __init__(self):
        self.index: dict[int, int] = {}   # id(W1) → entry, for the members of the current batch
        self.refs: list = []              # weakrefs to the members' (W1, A)
        self.outs: list = []              # per member: its U from the last batch until it is served
        self.fresh: list[bool] = []
        self.versions: list[tuple[int, int]] = []
        self.seen: dict[int, tuple] = {}  # id(W1) → (weakref W1, weakref A, the tick of its last call)
        self.tick = 0
        self.capturing = False            # inside a CUDA graph capture that has recomputed the batch
        self.spent = [False]              # the last batch's node has run its backward (its saved tensors freed)

    def get(self, w1: torch.Tensor, a: torch.Tensor, dt: torch.dtype, own):
        key = id(w1)
        i = self.index.get(key)
        if i is not None and (self.refs[i][0]() is not w1 or self.refs[i][1]() is not a):
            i = None  # a dead member's id reused, or another A with this W1
        prev = self.seen.get(key)
        since = prev[2] if prev is not None and prev[0]() is w1 and prev[1]() is a else None
        self.seen[key] = (weakref.ref(w1), weakref.ref(a), self.tick)
        self.tick += 1
        in_capture = _capturing(a)
        if not in_capture:
            self.capturing = False
        if (i is not None and self.fresh[i] and not self.spent[0] and self.versions[i] == (w1._version, a._version)
                and (self.capturing or not in_capture)):
            return self._serve(i)
        if since is None:  # its first call: its own U; it joins the batch at the next recomputation
            return own()
        self._compute(dt, since)
        self.capturing = in_capture
        return self._serve(self.index[key])

    def _serve(self, i: int) -> torch.Tensor:
        """Member i's U, handed out once and no longer held here: a held U keeps its batch's autograd graph alive,
        and with it the factors' gradient accumulators — created on the stream of the step that made them, so a
        later step on another stream (a CUDA graph's warm-up and capture) would reuse accumulators of the wrong
        stream (GPU run 90: the capture failed so)."""
        self.fresh[i] = False
        out, self.outs[i] = self.outs[i], None
        return out

    def _compute(self, dt, since: int):
        live = []
        for r1, r2, tick in list(self.seen.values()):
            w1, a = r1(), r2()
            if w1 is not None and a is not None and tick >= since and _backed(w1) and _backed(a):
                live.append((w1, a))
        self.seen = {k: v for k, v in self.seen.items() if v[0]() is not None and v[1]() is not None}
        n = len(live)
        self.spent = [False]
        self.outs = []  # the last batch's unserved U's go first (see _serve)
        self.outs = list(_KronBatch.apply(self.spent, dt, n, *(m[0] for m in live), *(m[1] for m in live)))
        self.refs = [(weakref.ref(w1), weakref.ref(a)) for w1, a in live]
        self.index = {id(w1): k for k, (w1, _) in enumerate(live)}
        self.fresh = [True] * n
        self.versions = [(w1._version, a._version) for w1, a in live]


_BATCHES: dict[tuple, _Batch] = {}


def kron_up(w1: torch.Tensor, a: torch.Tensor, dt: torch.dtype, own) -> torch.Tensor:
    """This layer's ``U = kron(W1, A)`` in ``dt`` ``(ol·ok, im·r)`` from the batch of its shape (module doc);
    ``own()`` builds it for this layer alone. The caller checks :func:`eligible` (``W1`` 2-D, ``A`` ``(ok, r)``,
    both trainable leaves of one device)."""
    key = ("kron", tuple(w1.shape), tuple(a.shape), w1.dtype, a.dtype, dt, a.device)
    batch = _BATCHES.get(key)
    if batch is None:
        batch = _BATCHES[key] = _Batch()
    return batch.get(w1, a, dt, own)

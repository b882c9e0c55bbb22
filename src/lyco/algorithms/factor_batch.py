"""One batched build per forward pass of the small factor products many layers of one shape rebuild every step —
LoKr's up ``U = kron(W1, A)`` of its low-rank form (:mod:`.lokr`) and LoHa's Khatri–Rao pair (:mod:`.loha`) —
differentiable, with one batched backward.

Why (issue 7): each LoKr layer on its LoRA form builds U forward and reduces ∂U to ∂W1, ∂A backward — two kernel
launches per layer and step even as Triton kernels (:mod:`.factor_triton`); GPU run 81's profile of a captured
SD1.5 b8 step had them at 1.43 ms over 242 launches each way (1.6 µs forward, 4.3 backward: launch slots, not
work). Here the layers of one shape share one stack of their factors, one build and, backward, one stack of their
∂U's and one reduction: five launches per shape group instead of two per layer (LoHa's pair likewise: its
four factors stacked, one launch each way). Measured on an H100, SD1.5 b8 as one CUDA graph, A/B/A against
``LYCO_FACTOR_BATCH=0``: LoKr 87.46 → 86.89 / 86.93 ms (run 91), LoHa 85.99 → 85.19 / 85.16 (run 92).

Which layers form a batch (:class:`PassBatch`, which OFT's batched Cayley inverse uses too): a layer's call is
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

import contextlib
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


def _kron_kernel(w1: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether the stacked Kronecker product and its backward run as :mod:`.factor_triton`'s launches."""
    return factor_triton.usable(a, factor_triton.kron_inner(w1.shape[2], a.shape[2]))


def _kron_build(w1: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``U[b] = kron(W1[b], A[b])`` for stacked ``W1 (n, ol, im)``, ``A (n, ok, r)`` → ``(n, ol·ok, im·r)``."""
    n, ol, im = w1.shape
    _, ok, r = a.shape
    if _kron_kernel(w1, a):
        return factor_triton.kron_forward_batched(w1, a)
    return torch.mul(w1.view(n, ol, 1, im, 1), a.view(n, 1, ok, 1, r)).view(n, ol * ok, im * r)


def _kron_grads(w1: torch.Tensor, a: torch.Tensor, gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂W1, ∂A)`` stacked, from the stacked ``∂U (n, ol·ok, im·r)``."""
    n, ol, im = w1.shape
    _, ok, r = a.shape
    if _kron_kernel(w1, a):
        return factor_triton.kron_backward_batched(w1, a, gu)
    g5 = gu.view(n, ol, ok, im, r)
    # ∂W1[b,i,j] = Σ_kρ ∂U[b,i,k,j,ρ]·A[b,k,ρ]; ∂A[b,k,ρ] = Σ_ij ∂U[b,i,k,j,ρ]·W1[b,i,j]
    # (GEMMs: accumulated in fp32)
    gp = g5.permute(0, 1, 3, 2, 4).reshape(n, ol * im, ok * r)  # one copy, read by both products
    gw1 = torch.matmul(gp, a.reshape(n, ok * r, 1)).view(n, ol, im)
    ga = torch.matmul(w1.reshape(n, 1, ol * im), gp)
    return gw1, ga.view(n, ok, r)


def _kr_kernel(a1, a2, b1=None, b2=None) -> bool:
    """Whether LoHa's stacked Khatri–Rao pair and its backward run as :mod:`.factor_triton`'s launches."""
    return factor_triton.usable(a1, factor_triton.kr_inner(a1.shape[2], a2.shape[2]))


def _kr_build(a1, a2, b1, b2):
    """LoHa's pair stacked: ``Ka[b] (n, out, r1·r2)`` and ``Kb[b] (n, r1·r2, c)`` (:mod:`.loha`'s Khatri–Rao)."""
    n, out, r1 = a1.shape
    r2, c = b2.shape[1:]
    if _kr_kernel(a1, a2):
        return factor_triton.khatri_rao_batched(a1, a2, b1, b2)
    return (torch.mul(a1.view(n, out, r1, 1), a2.view(n, out, 1, r2)).view(n, out, r1 * r2),
            torch.mul(b1.view(n, r1, 1, c), b2.view(n, 1, r2, c)).view(n, r1 * r2, c))


def _kr_grads(a1, a2, b1, b2, gka, gkb):
    """``(∂a1, ∂a2, ∂b1, ∂b2)`` stacked, from the stacked ``∂Ka``, ``∂Kb``."""
    n, out, r1 = a1.shape
    r2, c = b2.shape[1:]
    if _kr_kernel(a1, a2):
        return factor_triton.khatri_rao_backward_batched(a1, a2, b1, b2, gka, gkb)
    g4 = gka.view(n * out, r1, r2)  # ∂a1[o,i] = Σ_j ∂Ka[o,i,j]·a2[o,j], ∂a2[o,j] = Σ_i ∂Ka[o,i,j]·a1[o,i]
    ga1 = torch.bmm(g4, a2.reshape(n * out, r2, 1)).view(n, out, r1)
    ga2 = torch.bmm(a1.reshape(n * out, 1, r1), g4).view(n, out, r2)
    h4 = gkb.view(n, r1, r2, c)       # ∂b1[i,c] = Σ_j ∂Kb[i,j,c]·b2[j,c], ∂b2[j,c] = Σ_i ∂Kb[i,j,c]·b1[i,c]
    gb1 = (h4 * b2.view(n, 1, r2, c)).sum(2)
    gb2 = (h4 * b1.view(n, r1, 1, c)).sum(1)
    return ga1, ga2, gb1, gb2


class _Kind:
    """A product batched here: ``k`` factors in, ``m`` outputs per member; ``build(*stacked)`` → the m stacked
    outputs, ``grads(*stacked, *stacked output gradients)`` → the k stacked factor gradients; ``kernel(*stacked)``:
    whether ``grads`` runs as the Triton launch (no cuBLAS call: :func:`_tail_stream`'s condition)."""

    def __init__(self, name, k, m, build, grads, kernel):
        self.name, self.k, self.m, self.build, self.grads, self.kernel = name, k, m, build, grads, kernel


KRON = _Kind("kron", 2, 1, lambda w1, a: (_kron_build(w1, a),), _kron_grads, _kron_kernel)
KHATRI_RAO = _Kind("khatri-rao", 4, 2, _kr_build, _kr_grads, _kr_kernel)


#: the stream per CUDA device a batch's backward runs on where it adds its gradients into ``.grad`` (:func:`_tail`)
_TAIL_STREAM: dict = {}
#: per device: (event, recorded in a capture, tensors the tail stream reads) — waited for when the backward ends
_TAIL_LEFT: dict = {}


def _tail_stream(device: torch.device):
    """The tail stream on ``device`` (made once), or None on the CPU: there the tail's work runs in place."""
    from . import lowrank
    return lowrank.kept_stream(_TAIL_STREAM, device) if device.type == "cuda" else None


def _tail_sinks(ctx, used, stacked):
    """Per factor input (factor-major, as the node's inputs), the ``.grad`` its gradient may be added into by the
    batch's backward itself — or None where the tail does not apply: ``LYCO_FACTOR_TAIL`` (:mod:`.graph_policy`,
    captured steps by default), the trainer's grad sink on for the forward (``ctx.leaves``), the batch's gradients
    by its Triton launch on CUDA (no cuBLAS workspace on one more stream), and every used member's factors sinkable
    (:func:`.lowrank._sink_grad`: a dense ``.grad`` of the parameter's shape, no hooks, a backward that accumulates
    into it)."""
    from . import graph_policy, lowrank
    leaves = ctx.leaves
    if leaves is None or not graph_policy.wanted("LYCO_FACTOR_TAIL"):
        return None
    if stacked[0].is_cuda and not ctx.kind.kernel(*stacked):
        return None
    n = ctx.n
    sinks = [None] * len(leaves)
    for i, p in enumerate(leaves):
        if not used[i % n]:
            continue
        g = lowrank._sink_grad(p)
        if g is None:
            return None
        sinks[i] = g
    return sinks


def _tail_wait(device) -> None:
    """The current stream waits for the tail stream's batches (:func:`_tail`) — at the end of the backward pass
    (autograd's final callback) — and the tensors they read are let go (:func:`.lowrank.wait_left`)."""
    from . import lowrank
    lowrank.wait_left(_TAIL_LEFT, device)


def _tail(kind, n, gouts, stacked, out_meta, sinks) -> None:
    """The batch's backward where its factors' gradients go into their ``.grad`` (:func:`_tail_sinks`): on the tail
    stream (forked after everything issued so far), the members' gradients stacked, the batched reduction, and each
    member's gradient added into its parameter's ``.grad``; the current stream waits for it only when the backward
    pass ends. Why: the batch's backward runs once its last member's ∂U is in — in the middle of the frozen model's
    backward (the first layers of the forward are the last of the backward), whose next kernels then waited for it.
    H100, SD1.5 b1 LoKr f8 as one CUDA graph (run 262's timeline): its six ``_kron_bwd_kernel`` launches 21–96 µs
    each, 0.19 ms exposed, each after the copy that stacks the members' ∂U (up to 17.7 µs). The same discipline as
    :func:`.lowrank.side_stream`'s (the fork orders the tail after the tensors it reads; they are held until the
    current stream has waited), with the join moved to the end as :func:`.lowrank._late_join` moves its own."""
    from . import lowrank
    side = _tail_stream(gouts[next(i for i, g in enumerate(gouts) if g is not None)].device)
    ctxm = contextlib.nullcontext()
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(side.device))
        ctxm = torch.cuda.stream(side)
    with ctxm:
        gstack = _stack_outputs(kind, n, gouts, stacked, out_meta)
        grads = kind.grads(*stacked, *gstack)
        for f, g in enumerate(grads):
            for b, gb in enumerate(g.unbind(0)):
                lowrank._sink_add(gb, sinks[f * n + b])  # none for a member this pass did not use
    if side is not None:
        lowrank.leave_unjoined(_TAIL_LEFT, side, (gouts, stacked, gstack, grads), _tail_wait)


def _stack_outputs(kind, n, gouts, stacked, out_meta) -> list:
    """Per output of the product, the members' gradients stacked in the factors' dtype, zeros where a member's is
    None (a member that did not use it)."""
    gstack = []
    for j in range(kind.m):
        col = [gouts[b * kind.m + j] for b in range(n)]
        zero = None
        rows = []
        for g in col:
            if g is None:
                if zero is None:
                    shape, dtype, device = out_meta[j]
                    zero = torch.zeros(shape, dtype=dtype, device=device)
                g = zero
            rows.append(g)
        gstack.append(torch.stack(rows).to(stacked[0].dtype))
    return gstack


class _StackBatch(torch.autograd.Function):
    """Inputs ``(token, kind, dt, n, *factors)`` with the factors factor-major (every member's first factor, then
    every member's second, …); outputs member-major (member 0's m outputs, then member 1's, …) in ``dt``, views
    of the stacked results. ``token[0]`` turns true when the backward has run (the batch is spent)."""

    @staticmethod
    def forward(ctx, token, kind, dt, n, *factors):
        ctx.set_materialize_grads(False)
        ctx.token, ctx.kind, ctx.n = token, kind, n
        from . import casts
        # the parameters the backward may add its gradients into itself (_tail_sinks): under the trainer's grad sink
        ctx.leaves = (tuple(f if f.is_leaf and f.requires_grad else None for f in factors) if casts.sink_on()
                      else None)
        stacked, dtypes = [], []
        for f in range(kind.k):
            st = torch.stack(factors[f * n:(f + 1) * n])
            dtypes.append(st.dtype)
            stacked.append(st if st.dtype == dt else st.to(dt))
        ctx.dtypes = dtypes
        ctx.save_for_backward(*stacked)
        built = kind.build(*stacked)
        ctx.out_meta = [(o.shape[1:], o.dtype, o.device) for o in built]
        outs = [o.unbind(0) for o in built]
        return tuple(outs[j][b] for b in range(n) for j in range(kind.m))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gouts):
        stacked = ctx.saved_tensors
        ctx.token[0] = True  # this node's saved tensors are gone now: its outputs must not be served again
        kind, n = ctx.kind, ctx.n
        used = [any(g is not None for g in gouts[b * kind.m:(b + 1) * kind.m]) for b in range(n)]
        nothing = (None,) * (4 + kind.k * n)
        if not any(used):
            return nothing
        sinks = _tail_sinks(ctx, used, stacked)
        if sinks is not None:  # the gradients added into .grad here, off the current stream where it can be
            _tail(kind, n, gouts, stacked, ctx.out_meta, sinks)
            return nothing
        gstack = _stack_outputs(kind, n, gouts, stacked, ctx.out_meta)
        grads = kind.grads(*stacked, *gstack)
        out = [None] * (kind.k * n)
        for f, (g, dt0) in enumerate(zip(grads, ctx.dtypes)):
            g = g if g.dtype == dt0 else g.to(dt0)
            for b, gb in enumerate(g.unbind(0)):
                if used[b]:
                    out[f * n + b] = gb
        return (None, None, None, None, *out)


class PassBatch:
    """The members of one key and their last batch (module doc): the per-pass bookkeeping shared by this module's
    products and OFT's batched Cayley inverse (:func:`.oft.batched_inverse`).

    ``compute(live, dt, token)`` builds the batch for ``live`` (one tuple of factors per member) and returns one
    output per member; a differentiable build sets ``token[0]`` when its backward has run (the batch is spent
    then). ``serve_once``: a member's output is handed out once and not held here — required for outputs that
    carry an autograd graph (:meth:`_serve`); constants (OFT's inverse) stay held and are served while fresh."""

    def __init__(self, compute, serve_once: bool = True):
        self.compute, self.serve_once = compute, serve_once
        self.index: dict[int, int] = {}   # id(first factor) → entry, for the members of the current batch
        self.refs: list = []              # per member: weakrefs to its factors
        self.outs: list = []              # per member: its output from the last batch (until served, serve_once)
        self.fresh: list[bool] = []
        self.versions: list[tuple] = []
        self.seen: dict[int, tuple] = {}  # id(first factor) → (weakrefs to the factors, the tick of its last call)
        self.tick = 0
        self.capturing = False            # inside a CUDA graph capture that has recomputed the batch
        self.spent = [False]              # the last batch's node has run its backward (its saved tensors freed)

    def get(self, factors: tuple, dt: torch.dtype, own):
        """This member's output; ``own()`` builds it for this member alone (its first call)."""
        key = id(factors[0])
        i = self.index.get(key)
        if i is not None and any(r() is not f for r, f in zip(self.refs[i], factors)):
            i = None  # a dead member's id reused, or other factors with this first one
        prev = self.seen.get(key)
        since = prev[1] if prev is not None and all(r() is f for r, f in zip(prev[0], factors)) else None
        self.seen[key] = (tuple(weakref.ref(f) for f in factors), self.tick)
        self.tick += 1
        # inside a CUDA graph capture the batch is served only once the capture has recomputed it: a replay runs
        # no host code, so a batch the graph did not compute itself would be read unchanged by every replay
        in_capture = _capturing(factors[0])
        if not in_capture:
            self.capturing = False
        if (i is not None and self.fresh[i] and not self.spent[0]
                and self.versions[i] == tuple(f._version for f in factors)
                and (self.capturing or not in_capture)):
            return self._serve(i)
        if since is None:  # its first call: its own build; it joins the batch at the next recomputation
            return own()
        self._compute(dt, since)
        self.capturing = in_capture
        return self._serve(self.index[key])

    def _serve(self, i: int):
        """Member i's output. With ``serve_once`` handed out once and no longer held here: held outputs keep their
        batch's autograd graph alive, and with it the factors' gradient accumulators — created on the stream of
        the step that made them, so a later step on another stream (a CUDA graph's warm-up and capture) would
        reuse accumulators of the wrong stream (GPU run 90: the capture failed so)."""
        self.fresh[i] = False
        out = self.outs[i]
        if self.serve_once:
            self.outs[i] = None
        return out

    def _compute(self, dt, since: int):
        """The batch over the members called since the caller's previous call (its previous forward pass), those
        whose factors are alive and still hold their storage."""
        live = []
        for refs, tick in list(self.seen.values()):
            fs = tuple(r() for r in refs)
            if tick >= since and all(f is not None and _backed(f) for f in fs):
                live.append(fs)
        self.seen = {k: v for k, v in self.seen.items() if all(r() is not None for r in v[0])}
        self.spent = [False]
        self.outs = []  # the last batch's unserved outputs go first (see _serve)
        self.outs = list(self.compute(live, dt, self.spent))
        self.refs = [tuple(weakref.ref(f) for f in m) for m in live]
        self.index = {id(m[0]): b for b, m in enumerate(live)}
        self.fresh = [True] * len(live)
        self.versions = [tuple(f._version for f in m) for m in live]


def _stacked(kind: _Kind):
    """:class:`PassBatch`'s ``compute`` for a stacked product: one :class:`_StackBatch` node, the outputs per
    member (a tuple where the kind has several)."""
    def compute(live, dt, token):
        n = len(live)
        flat = _StackBatch.apply(token, kind, dt, n, *(m[f] for f in range(kind.k) for m in live))
        return [flat[b] if kind.m == 1 else tuple(flat[b * kind.m:(b + 1) * kind.m]) for b in range(n)]
    return compute


_BATCHES: dict[tuple, PassBatch] = {}


def _batch(kind: _Kind, factors, dt) -> PassBatch:
    key = (kind.name, *(tuple(f.shape) for f in factors), *(f.dtype for f in factors), dt, factors[0].device)
    batch = _BATCHES.get(key)
    if batch is None:
        batch = _BATCHES[key] = PassBatch(_stacked(kind))
    return batch


def kron_up(w1: torch.Tensor, a: torch.Tensor, dt: torch.dtype, own) -> torch.Tensor:
    """This layer's ``U = kron(W1, A)`` in ``dt`` ``(ol·ok, im·r)`` from the batch of its shape (module doc);
    ``own()`` builds it for this layer alone. The caller checks :func:`eligible` (``W1`` 2-D, ``A`` ``(ok, r)``,
    both trainable leaves of one device)."""
    return _batch(KRON, (w1, a), dt).get((w1, a), dt, own)


def khatri_rao(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor, dt: torch.dtype, own):
    """This LoHa layer's ``(Ka, Kb)`` — ``(out, r1·r2)`` and ``(r1·r2, c)`` in ``dt`` — from the batch of its
    shape; ``own()`` builds them for this layer alone. The caller checks :func:`eligible` (a1, a2
    ``(out, r·)``; b1, b2 ``(r·, c)``: the flattened down halves)."""
    fs = (a1, a2, b1, b2)
    return _batch(KHATRI_RAO, fs, dt).get(fs, dt, own)

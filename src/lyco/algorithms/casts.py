"""The adapter's casts within one training step (:func:`step_casts`) — shared by the ops of :mod:`.lowrank` and the
rebuilt ops' builds (DoRA, GLoRA), through :func:`cast_factor` and :func:`cast_input`.

Under mixed precision (``lyco train``: a bf16 model, the adapter's parameters in fp32, kept by
:class:`lyco.optim.FlatAdamW` as views of one flat buffer) each op cast its factors to the compute dtype in forward and
again in backward, and every layer that reads a norm's fp32 output cast it for itself. Inside the block a storage is
cast once per step (FlatAdamW's buffer: one kernel for every layer's factors) and an input once for the ops that share
it. benchmarks/NOTES.md changes 83–85.
"""

from __future__ import annotations

import contextlib

import torch

#: the factors' casts within one training step (:func:`step_casts`): (storage, dtypes) → the whole storage cast
_CASTS: list = [None]

#: whether the low-rank ops add their factors' gradients into the parameters' ``.grad`` themselves (:func:`step_casts`)
_SINK: list = [False]

#: storages of at most this many elements are cast whole (one kernel for every factor that lives in them)
CAST_WHOLE_MAX = 1 << 26


@contextlib.contextmanager
def step_casts(grad_sink: bool = False):
    """Within this block the ops cast an adapter's factors to the compute dtype once per storage, not per layer
    and direction: the first factor met in a storage (a :class:`lyco.optim.FlatAdamW` group's flat buffer holds
    all of them) casts the whole storage, and every factor in it — forward and backward, its own layer's and
    every other's — is a view of that one cast. Without the block each op casts its two factors in forward and
    again in backward: under mixed precision (fp32 adapter, bf16 model) 709 cast kernels of a LoRA step on SD1.5
    (H100 run 117's profile, NOTES change 83). The trainer wraps each step's forward and backward in it (the
    parameters do not change inside a step: the optimizer runs outside); a CUDA graph captured inside it replays
    the storage's cast at its first use each time. Blocks nest (each its own casts).

    ``grad_sink``: a linear layer's factor that is a parameter with a ``.grad`` already (the trainer's captured steps
    keep them, views of one flat buffer; a second micro-batch of an accumulation) gets its gradient added into that
    ``.grad`` by the GEMM that computes it (``beta = 1``; in fp32 from bf16 products where torch's ``addmm`` takes
    ``out_dtype``), and the op returns none for it — autograd's per-parameter accumulation, one add kernel per factor
    (384 per LoRA step on SD1.5), is skipped. Only where nothing else watches that accumulation: no hook on the
    parameter (:func:`.lowrank._sink_into`), and the caller's — the trainer enables it with one process or its flat gradient
    all-reduce, never under DDP's per-parameter hooks or FSDP — and only in a backward pass that accumulates into
    that parameter (``.backward()``; not ``torch.autograd.grad`` nor ``.backward(inputs=…)`` without it: asked of
    autograd's engine per call, :func:`.lowrank._engine_accumulates`)."""
    prev = _CASTS[0], _SINK[0]
    _CASTS[0], _SINK[0] = {}, bool(grad_sink)
    try:
        yield
    finally:
        _CASTS[0], _SINK[0] = prev


def cast_factor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` — inside :func:`step_casts` a view of its storage's one cast, else ``t.to(dtype)``. The
    cached view is not differentiable: it serves code that runs inside an autograd Function's forward or backward
    (the low-rank ops, the rebuilt ops' builds); where autograd records (a build's own autograd form, a nested pass
    through it) the cast is the differentiable ``t.to(dtype)``."""
    if t.dtype == dtype:
        return t
    cache = _CASTS[0]
    if cache is None or t.numel() == 0 or (t.requires_grad and torch.is_grad_enabled()):
        return t.to(dtype)
    # keyed by the storage's address, and the entry holds the storage: while it is cached no other tensor can be
    # given that memory (a factor built in the step — LoHa's — and freed would otherwise pass its address on)
    st = t.untyped_storage()
    n = st.nbytes() // t.element_size()
    with torch.no_grad():
        if n > max(CAST_WHOLE_MAX, t.numel()):  # a factor inside something large: cast it alone, once
            key = (st.data_ptr(), t.dtype, dtype, t.storage_offset(), tuple(t.shape), t.stride())
            hit = cache.get(key)
            if hit is None:
                hit = cache[key] = (st, t.detach().to(dtype))
            return hit[1]
        key = (st.data_ptr(), t.dtype, dtype)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = (st, t.new_empty(0).set_(st, 0, (n,), (1,)).to(dtype))
        return hit[1].as_strided(t.shape, t.stride(), t.storage_offset())


def cast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A layer's input in the compute dtype — inside :func:`step_casts` the previous op's cast where the previous op
    had the same input (under autocast a LayerNorm's fp32 output feeds q, k and v, and each cast it: three casts of
    one tensor, now one; the same values). One entry, keyed by the input's memory, layout and version, and holding
    its storage (no other tensor can be given that memory while the entry stands); the next op's other input
    replaces it. Cached only where autograd does not record (as :func:`cast_factor`)."""
    if x.dtype == dtype:
        return x
    cache = _CASTS[0]
    if cache is None or (x.requires_grad and torch.is_grad_enabled()):
        return x.to(dtype)
    st = x.untyped_storage()
    key = (st.data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x._version, x.dtype, dtype)
    hit = cache.get("input")
    if hit is not None and hit[0] == key:
        return hit[2]
    xd = x.to(dtype)
    cache["input"] = (key, st, xd)
    return xd


def sink_on() -> bool:
    """Whether the block in force asks the low-rank ops to add factor gradients into ``.grad`` (``grad_sink``)."""
    return _SINK[0]


"""CUDA graphs for the training step (``[train] cuda_graph = true``).

An adapter step on a diffusion UNet issues thousands of small kernels (a rank-16 LoRA on SD1.5's 192
attention/MLP layers adds ~1650 aten ops to the frozen model's ~1400 per forward + backward,
``benchmarks/op_count.py``); on an H100 the host then needs as long to
*launch* them as the GPU needs to run them (issue 7, ``benchmarks/NOTES.md``). A CUDA graph records
the kernels of one forward + backward pass once and replays them with one launch.

:class:`GraphedStep` wraps ``fn(inputs) -> loss`` — a function that computes the loss from a pytree of
tensors *and calls backward itself* — and, for every distinct input signature (tree structure, shapes,
dtypes: one per aspect-ratio bucket), captures it once:

1. the trainable parameters get gradient tensors of their own if they have none (outside the graph's
   memory), so the captured backward *accumulates* into them in place — gradient accumulation over
   micro-batches then works as in eager mode, and the optimizer, the gradient clipping and the
   all-reduce of several processes (eager, a handful of kernels) read and zero the same tensors;
2. the inputs are copied into static buffers; ``warmup`` eager calls on a side stream (what torch's
   graph capture needs: lazy initialisations, cuBLAS workspaces, the fp16 loss scale) are made and
   their gradients discarded (the gradients and the RNG states are restored after capture, so
   capturing in the middle of an accumulation changes nothing);
3. the call is captured into one graph; graphs of all signatures share one memory pool (they are
   replayed one at a time and keep nothing between replays but their loss).

Every later call with that signature copies the new inputs into the static buffers and replays.
What cannot be captured falls back to eager mode for good, with one warning naming the reason
(e.g. an operation that waits for the host): a run never fails because of this option. More than
``max_graphs`` signatures (many buckets) run the extra ones eagerly.

Measured (H100/H200, ``benchmarks/check_cuda_graph.py``, ``train_graph.py``, ``ddp_scaling.py``): the
adapters are bit-identical to eager training on the tiny model for LoRA, LoCon, LoHa, LoKr, DoRA,
Diag-OFT, BOFT, GLoRA, (IA)³ and Full; with the text
encoder trained the gradients differ by ~1e-4 relative (rounding; presumably other kernels inside a
capture). Those comparisons run lyco's captured-steps-only paths in both modes (``check_cuda_graph.py`` sets
``LYCO_FACTOR_KERNELS=1`` and ``LYCO_BYPASS_OP=1``); by default (``algorithms/graph_policy.py``) only the
warm-up and the capture take them, so an eager step (a fallback, an extra signature) computes LoHa's/LoKr's
factor gradients summed in another order and the low-rank adapters' ∂x without the merged weight's rounding:
the same function, gradients equal to bf16 rounding, not bit for bit. One failure seen, outside the trainer: in the DDP benchmark, capturing a LoRA step right
after an *eager* forward + backward of the same network in the same process failed (twice in a row)
with "operation failed due to a previous error during capture" (a second attempt failed the same
way), while LoKr did not and a capture made first always succeeded; the trainer captures at its first
step, before any eager backward, and falls back to eager mode should it happen. The cause is not found.

The libraries' memset nodes in a captured graph (cuDNN's, cuBLAS's) can be made kernel nodes before it is
instantiated — :mod:`.graph_memsets`, on by default (``LYCO_GRAPH_MEMSETS=0`` keeps them); where it cannot run or
its device self-test fails, the graph stays as captured with one warning.

What a graph cannot do: decisions the host makes per step are frozen at their captured values —
the config refuses module_dropout and DyLoRA with ``cuda_graph`` for that reason (``config.validate``);
device-side randomness (dropout, rank dropout) is fine: the default CUDA generator is registered with
every graph and advances on every replay (the trainer reseeds it per step, as in eager mode).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..algorithms import graph_policy
from . import blas_carveout, graph_memsets

log = logging.getLogger("lyco.train")


class _Captured:
    __slots__ = ("replay", "static", "out")

    def __init__(self, replay: Callable[[], None], static: list, out: Any):
        self.replay, self.static, self.out = replay, static, out


class GraphedStep:
    """``fn(inputs)`` captured once per input signature and replayed (see the module docstring).

    ``params``: the tensors whose gradients ``fn``'s backward produces (those requiring a gradient
    are kept). Counters ``captures``/``replays``/``eager_calls``/``retried``/``memsets_replaced`` and
    ``disabled_reason`` say what happened. A capture that fails is warmed up and tried ``capture_retries`` more
    times before the step runs eagerly (a failure in the warm-up is not retried: that is the step itself)."""

    #: further attempts at a capture that failed (see :meth:`_capture`)
    capture_retries = 1

    #: a subclass that replaces the CUDA parts (the CPU tests' stand-in) sets this to run on any device
    runs_without_cuda = False

    def __init__(self, fn: Callable[[Any], Any], params: Sequence[torch.Tensor], *, warmup: int = 2,
                 max_graphs: int = 8):
        self.fn = fn
        self.params = [p for p in params if p.requires_grad]
        self.warmup = max(1, int(warmup))
        self.max_graphs = int(max_graphs)
        self.graphs: dict[Any, _Captured] = {}
        self.disabled_reason: str | None = None
        self.captures = self.replays = self.eager_calls = self.retried = 0
        self.memsets_replaced = 0  # the libraries' memset nodes made kernel nodes in the captures (graph_memsets)
        self.flat_grads: list[torch.Tensor] | None = None  # see ensure_grads
        self._pool = None
        self._stream = None
        self._warned_many = False

    # -- what differs between a real GPU and the CPU tests (which replace these three) ------------
    def _side_stream(self):
        """Context for the warm-up calls: off the default stream (as torch requires) and on the stream
        the capture will use, so that what libraries set up lazily per stream (cuBLAS workspaces) exists
        before the capture starts."""
        s = self._capture_stream()
        s.wait_stream(torch.cuda.current_stream())
        ctx = torch.cuda.stream(s)

        @contextlib.contextmanager
        def run():
            with ctx:
                yield
            torch.cuda.current_stream().wait_stream(s)
        return run()

    def _capture_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _record(self, call: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        """Capture ``call()`` into a graph: (replay, the captured output)."""
        g = graph_memsets.new_graph()
        # thread_local: only this thread's unsafe calls invalidate the capture (a logger or a data-loader
        # thread may touch CUDA meanwhile without breaking it)
        # LYCO_BLAS_CARVEOUT (off by default): cuBLAS's kernels chosen for fewer SMs, the rest left to the side
        # streams' products, during the capture only (blas_carveout)
        with blas_carveout.during_capture(), torch.cuda.graph(g, pool=self._pool, stream=self._capture_stream(),
                                                              capture_error_mode="thread_local"):
            out = call()
        # the libraries' memset nodes (cuDNN attention's, convolutions', cuBLAS's) as kernel nodes where
        # LYCO_GRAPH_MEMSETS=1 (the default): each delayed the kernel after it by 5-9 µs in a replay
        # (graph_memsets)
        self.memsets_replaced += graph_memsets.finish(g)
        if self._pool is None:  # the graphs of all signatures share one memory pool (module docstring, 3.)
            self._pool = g.pool()
        return g.replay, out

    def _restore(self, grads: list[torch.Tensor], rng) -> None:
        """The gradients and RNG states as before a warm-up and capture (which must leave no trace)."""
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.grad.copy_(g)
        self._set_rng_states(rng)

    @staticmethod
    def _rng_states():
        return torch.get_rng_state(), (torch.cuda.get_rng_state() if torch.cuda.is_available() else None)

    @staticmethod
    def _set_rng_states(states) -> None:
        torch.set_rng_state(states[0])
        if states[1] is not None:
            torch.cuda.set_rng_state(states[1])

    @staticmethod
    @contextlib.contextmanager
    def _sync_errors(on: bool):
        if not on or not torch.cuda.is_available():
            yield
            return
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(before)

    # -- the step -----------------------------------------------------------------------------------
    @staticmethod
    def _signature(leaves, spec):
        sig = []
        for t in leaves:
            if isinstance(t, torch.Tensor):
                sig.append((tuple(t.shape), t.dtype, str(t.device), t.requires_grad))
            else:
                sig.append(("value", repr(t)))
        return (str(spec), tuple(sig))

    def ensure_grads(self) -> None:
        """A zero gradient tensor for every parameter that has none (see the module docstring, 1.).

        When no parameter has one yet, the gradients are made views of one flat buffer per device and
        dtype (``flat_grads``): the backward accumulates into them as into separate tensors, and several
        processes then average *all* gradients with one all-reduce of each buffer and no copies
        (:meth:`lyco.train.loop.FlatGradSync.adopt`) instead of one copy kernel per parameter."""
        if self.params and all(p.grad is None for p in self.params):
            groups: dict[tuple, list[torch.Tensor]] = {}
            for p in self.params:
                groups.setdefault((p.device, p.dtype), []).append(p)
            self.flat_grads = []
            for (device, dtype), ps in groups.items():
                flat = torch.zeros(sum(p.numel() for p in ps), device=device, dtype=dtype)
                off = 0
                for p in ps:
                    p.grad = flat[off:off + p.numel()].view_as(p)
                    off += p.numel()
                self.flat_grads.append(flat)
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def __call__(self, inputs: Any) -> Any:
        if self.disabled_reason is not None:
            return self._eager(inputs)
        leaves, spec = tree_flatten(inputs)
        key = self._signature(leaves, spec)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                if not self._warned_many:
                    log.warning("cuda_graph: more than %d batch shapes; the extra ones run without a graph "
                                "(fewer aspect-ratio buckets keep every step graphed)", self.max_graphs)
                    self._warned_many = True
                return self._eager(inputs)
            entry = self._capture(leaves, spec)
            if entry is None:
                return self._eager(inputs)
            self.graphs[key] = entry
        with torch.no_grad():
            for s, t in zip(entry.static, leaves):
                if isinstance(s, torch.Tensor):
                    s.copy_(t, non_blocking=True)
        entry.replay()
        self.replays += 1
        return entry.out

    def _eager(self, inputs):
        self.eager_calls += 1
        return self.fn(inputs)

    def _capture(self, leaves, spec) -> _Captured | None:
        self.ensure_grads()
        saved = [p.grad.detach().clone() for p in self.params]
        rng = self._rng_states()
        static = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                  for t in leaves]
        args = tree_unflatten(static, spec)
        try:
            for attempt in range(1 + self.capture_retries):
                with self._side_stream(), graph_policy.graph_step():
                    for i in range(self.warmup):
                        # the last warm-up call runs with torch's sync debugging set to "error": an operation that
                        # waits for the host (which would break the capture with an unhelpful "operation failed
                        # due to a previous error during capture") raises here, where its traceback names it
                        with self._sync_errors(i == self.warmup - 1):
                            self.fn(args)
                # the warm-up's activations sit freed in the caching allocator's ordinary pool; the capture
                # allocates from the graphs' private pool, so hand them back first: otherwise a step that
                # fits eagerly could need twice its activation memory for the moment of the capture
                # (graphs are on by default since [train] cuda_graph = "auto")
                if torch.cuda.is_initialized():
                    torch.cuda.empty_cache()
                try:
                    with graph_policy.graph_step():  # paths whose host cost only a replayed graph hides
                        replay, out = self._record(lambda: self.fn(args))
                    break
                except Exception as e:  # noqa: BLE001
                    # a capture that the warm-up's checks let through and that still failed: LoKr with gradient
                    # checkpointing failed so now and then on an H100 and passed in the next process (GPU runs
                    # 85-98, benchmarks/NOTES.md changes 64 and 70; the cause is not found) — so once more, from a
                    # fresh warm-up, before training without graphs
                    if attempt == self.capture_retries:
                        raise
                    self.retried += 1
                    log.warning("cuda_graph: the capture failed (%s); warming up and capturing once more",
                                f"{type(e).__name__}: {e}".splitlines()[0][:200] + _where(e.__traceback__))
                    self._restore(saved, rng)
        except Exception as e:  # noqa: BLE001 — any failure to capture means: train without graphs
            self.disabled_reason = f"{type(e).__name__}: {e}".splitlines()[0][:300] + _where(e.__traceback__)
            log.warning("cuda_graph: the training step could not be captured (%s); training continues "
                        "without CUDA graphs", self.disabled_reason)
            return None
        finally:
            self._restore(saved, rng)
        self.captures += 1
        return _Captured(replay, static, out)


def _where(tb) -> str:
    """`` (at file:line in function)`` of the innermost frame outside torch's own files: where a
    failed capture came from."""
    import traceback
    from pathlib import Path
    frames = [f for f in traceback.extract_tb(tb) if "torch" not in Path(f.filename).parts]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} in {f.name})"

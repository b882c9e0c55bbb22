"""Two ops for low-rank deltas, one backward: the rebuild path's ``y = op(x, W + s·U·D, b)`` and the bypass
op (below), for every adapter whose delta is a product ``ΔW = γ·U·D`` (LoRA/LoCon, DyLoRA outside training,
LoHa through its Khatri–Rao form, a LoRA of rank r1·r2, and — the bypass op only — LoKr's low-rank W2:
``kron(W1, A)·kron(I, B)``). ``mode = "rebuild"`` takes the first.

``D`` is ``(r, in)`` or a conv kernel ``(r, in, *k)`` that carries the layer's stride, padding and
dilation; ``U`` is ``(out, r)`` (or ``(out, r, 1…)``); ``s = m·γ`` is a Python number.

Against the generic rebuilt op of :mod:`.rebuild` (``∂W′ = ∂yᵀx`` — one weight-gradient GEMM, as
full fine-tuning pays — then ``∂θ`` by a nested autograd pass through ``merged``) the adapter's
gradients come from the factors: ``h = D∗x`` (recomputed in backward: one read of x),
``∂U = s·∂yᵀh``, ``∂D = s·(Uᵀ∂y)ᵀx`` — three skinny products that read ∂y and x, no weight-sized
gradient, no autograd re-entry; for a 2-D conv with stride 1 ``∂D`` is one batched GEMM of the rank-sized
∂h's shifted copies (an im2col of ∂h, r·k² rows) against x in its NCHW layout, where cuDNN's weight gradient
converts x to NHWC first (:func:`_conv_wgrad_nchw`) — and ``∂x = opᵀ(∂y, W + s·U·D)``, the frozen layer's own input
gradient with the merged weight (one weight-sized ``addmm`` to rebuild it; in captured steps one Triton pass,
:func:`_merge_kernel`). Only x and the factors are
kept for backward, never ``W′`` (as in :mod:`.rebuild`); the bypass op keeps, instead of a linear layer's x, the
tensors its producer keeps anyway where x can be rebuilt from them (:mod:`.regen`: a GEGLU's operands).

Numerics, as every rebuild: ``W + s·U·D`` is rounded once to the compute dtype (bf16: 2⁻⁹ relative per
element), so deltas far below that vanish from the forward (what LyCORIS's default non-bypass
training does); that is why ``mode = "auto"`` keeps these algorithms on the delta path. The gradients
of U and D never see the merge.

**The bypass op** (:func:`bypass_op`, the delta path's ``f(x) + s·U·(D∗x)`` computed exactly forward — except a
linear layer's in captured steps, which runs through ``W + s·U·D`` built a layer ahead, :func:`_fwd_weights`) has
the same backward: ``∂x = opᵀ(∂y, W + s·U·D)`` — one input-gradient GEMM/conv with the merged weight in
place of the frozen layer's and the adapter's own (``(s·Uᵀ∂y)∗ᵀD``), and no sum of the two; ``∂U`` from the
saved ``h``; ``∂D`` as above. It costs a Python backward per layer: runs 10–11 (benchmarks/NOTES.md) measured ≈ 1 ms of
device time saved per SD1.5 b8 step and eager LoCon/LoHa steps 10–20 % slower for host time, so it runs
under :mod:`.graph_policy` (``LYCO_BYPASS_OP``: by default only in steps captured as CUDA graphs, where the
host's cost is paid once). Its ∂x carries the merge's rounding (as the rebuild path's does; a delta far
below 2⁻⁹·|W| drops out of the gradient that reaches earlier layers, not out of the forward or of ∂U/∂D).
A Triton kernel fusing the adapter into the frozen GEMM lost to cuBLAS (runs 11, 50–51). On a layer wider out
than in (:func:`_cat_pays`: GEGLU's projection; with enough rows, :func:`_cat_forward_pays`) the frozen GEMM itself
takes the adapter's up, as one GEMM over ``[x | h]`` and ``[W | s·U]`` — the same sum, rounded once in bf16 where the delta path rounds ``f(x)`` and then
the sum — and the backward's ∂x GEMM gives ∂h with it. LoKr's low-rank W2 enters with a grouped down
(``groups`` = in_m: its B on each channel group of a linear or conv input; ``D = kron(I, B)`` is never formed).

**Two streams** (:func:`side_stream`, ``LYCO_BYPASS_STREAMS``, by default in captured steps only): the adapter's own
gradients (∂U, ∂h, ∂D) need nothing the frozen layer's input gradient computes, and a conv adapter's forward h
nothing the frozen conv computes, so they run on a side stream while the frozen layer's GEMM/conv runs; in a
CUDA graph the fork and the join are edges and the branches overlap. H100, SD1.5 b8 as one graph (runs 95–96;
benchmarks/NOTES.md change 67): LoCon 83.5 → 82.1–82.2 ms (backward −1.1, conv forward −0.3), LoHa
84.7 → 83.5–83.6, LoRA and LoKr within 0.1 ms. A linear layer's forward h runs on the side stream only where that
costs no cuBLAS workspace of its own (:func:`_forward_side`): torch keeps a 32 MiB workspace per thread's handle and
stream, and with the backward on autograd's device thread the forward's thread needed one more for the side stream
(run 95: −0.3 ms for +0.03 GiB on every peak); captured steps run the backward on the calling thread
(:func:`.graph_policy.graph_step`), which shares it (run 174: SDXL b1 LoRA 77.30 → 76.46 ms, SD1.5 b1 23.53 →
23.24 in run 176; SDXL b4 and SD1.5 b8 unchanged). Every side region keeps cuBLAS's workspace there small where torch
can size it (:func:`_side_blas`).
In the backward ∂U runs on a second side stream (:func:`up_stream`, ``LYCO_SIDE_SPLIT``) beside the ∂h → ∂D chain,
the longer branch (run 139, NOTES change 95: LoRA 73.80 → 73.22–73.33 ms, LoCon 75.52 → 74.83–74.90, LoHa
78.06 → 77.48–77.57; its cuBLAS workspace +0.03 GiB on the peaks). After its ∂U each op's backward builds the
next backward's merged weight there (:func:`_ahead_link`, ``LYCO_MERGE_AHEAD``; run 140, change 96: LoRA
73.36 → 73.05–73.12 ms, LoCon 74.94 → 74.66–74.72, LoHa 77.60 → 77.41–77.43, LoKr 84.68 → 84.47–84.60).

**The conv forward's epilogue** (:func:`_conv_epilogue`, ``LYCO_CONV_EPILOGUE``; :func:`_conv_nhwc`,
``LYCO_CONV_NHWC``; both captured steps by default): the frozen conv runs without its bias and one Triton pass
(:func:`.lowrank_triton.up_add`) writes ``y = conv(x, W) + s·U·h + b`` — torch adds a cuDNN conv's bias in a
broadcast pass of its own and the up was an in-place ``baddbmm``, two read-modify-writes of the output. A k×k conv's
input goes channels-last once, by a tiled Triton copy, for both the frozen conv and the adapter's (cuDNN converts an
NCHW input for each of them and converts its output back), and the epilogue's pass writes the NCHW output from the
channels-last one. Every SD1.5 b8 conv alone (run 107, forward + backward): the 3×3 convs 25.1 → 21.8 ms summed, the
1×1 convs 3.0 → 2.5; the step as one graph (runs 107–108): LoCon 81.3 → 77.7–77.8 ms, LoHa 82.8 → 79.3–79.4, LoRA (its
32 1×1 convs) 76.5 → 75.9–76.1, LoKr 86.5 → 85.2–85.5 (its grouped adapter's conv keeps reading the NCHW x). The
channels-last copy by torch's strided ``contiguous`` lost even to cuDNN's own conversions at 64×64 (run 107, the 12
convs there: 7.13 ms with it, 6.74 with cuDNN's conversions, 6.03 with the tiled copy). On that path the weights go
channels-last by the same tiled copy (:func:`_weight_cl`; run 142: LoCon 75.43 → 75.02–75.06 ms, LoHa 78.42 →
77.92–77.94), and the adapter's down is one GEMM of its per-tap products and a Triton tap sum (:func:`_taps_down`;
run 143: LoCon 74.22 → 73.29–73.31, LoHa 76.89 → 75.71–75.72; cuDNN's r-output conv ran 64-output tiles in run 141's profile);
the backward's ∂x channels-last the same way (∂y in and ∂x out by the tiled copy) cost +2 ms on LoCon's step (run
108; +5.7 with the merged weight written channels-last by a Triton merge, run 110: cuDNN's channels-last dgrad at
64×64 is the slow part) and was taken out. With it SD1.5's 8×8 convs join the op (:func:`bypass_pays`). The output is rounded once
(``conv + s·U·h + b`` in fp32) where the delta path rounds ``conv + b`` and then the sum: within bf16 rounding of
it, no longer bit-identical.

**In a training step** (:func:`.casts.step_casts`, which ``lyco train`` wraps around each micro-batch): the factors
come from one cast of their storage per step and an input several ops share is cast once (:mod:`.casts`); both ops keep
the factors as cast for their backward; the factors' gradients — and a linear layer's ∂x where its input is fp32 (a
norm's output under autocast) — leave their GEMMs in fp32 (``out_dtype``, :func:`_out_dtype_ok`); with ``grad_sink`` a
linear layer's factor gradients are added into the parameters' existing ``.grad`` by those GEMMs (:func:`_sink_into`).
H100, the real trainer (benchmarks/NOTES.md changes 83–85, each measured against the code before it in its own run,
runs 122–125): SD1.5-sized LoRA 91.7 → 87.5 ms per step with autocast,
80.1 → 77.5 without; SDXL-sized 262.1 → 246.8.

Under ``torch.compile`` the op is not used; with autograd disabled the forward runs without the
Function. Autocast: the compute dtype is the one autocast would pick for ``op(x, W)``; every operand is
cast to it explicitly.
"""

from __future__ import annotations

import contextlib
import os
import weakref

import torch
import torch.nn.functional as F

from . import blas_sms, casts, graph_policy, regen, regen_triton, wgrad_triton
from .base import _CONV_FN, CONV2D, LINEAR, LayerSpec, layer_op, scaled_bmm as _bmm
from .casts import cast_factor, cast_input
from .rebuild import cast, like, op_backward, supports as rebuild_supports

#: one cheap call to skip the per-device autocast queries in the common case (no autocast anywhere)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def supports(spec: LayerSpec, x: torch.Tensor) -> bool:
    """What :mod:`.rebuild` computes itself (linear; convs with integer zero padding), ungrouped convs
    on batched input only (the factors' conv layout has no groups)."""
    if not rebuild_supports(spec):
        return False
    if spec.kind == LINEAR:
        return x.shape[-1] == spec.in_dim
    return spec.groups == 1 and x.dim() == len(spec.kernel) + 2


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``op(x, W)`` computes in: autocast's for a float32/16 input under autocast, else x's."""
    if _any_autocast() and x.dtype != torch.float64 and x.is_floating_point():
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    return x.dtype


#: one side stream per CUDA device for the adapter's own products (:func:`side_stream`)
_SIDE: dict = {}


def side_stream(t: torch.Tensor):
    """The stream the op runs the adapter's own products on while the frozen layer's GEMM/conv runs on the current
    one (``LYCO_BYPASS_STREAMS``, :mod:`.graph_policy`: by default in captured steps, where the fork and join become
    edges of the graph and the two branches run concurrently), or None (the CPU, the policy off).

    Why it is safe with torch's caching allocator without ``record_stream`` (which, during a capture, would keep
    every such block from reuse until the capture ends): every region on the side stream starts by waiting for the
    current stream (:func:`_fork`) and the op waits for the side stream (:func:`_join`) before it returns. So (1) a
    tensor of the current stream that the side stream reads is freed only after the join — its reuse comes after
    the side stream's reads; (2) a tensor the side stream allocates and the current stream uses later (h, ∂U, ∂D)
    is freed outside any region, and the side stream can reuse its block only in a later region, whose fork orders
    it after everything the current stream was given before — that last use included; (3) temporaries the side
    stream allocates and frees within a region are ordered on that stream."""
    if not graph_policy.wanted("LYCO_BYPASS_STREAMS") or t.device.type != "cuda":
        return None
    return kept_stream(_SIDE, t.device)


def kept_stream(store: dict, device: torch.device):
    """``store``'s stream for the CUDA ``device``, made on first use and kept (lyco's side streams: one per purpose and
    device, so that the capture's branches and torch's per-stream cuBLAS workspaces stay few)."""
    st = store.get(device)
    if st is None:
        st = store[device] = torch.cuda.Stream(device)
    return st


def _forward_side(x: torch.Tensor):
    """The side stream for a linear layer's forward down ``h = x·Dᵀ`` beside the frozen GEMM
    (``LYCO_FORWARD_SIDE``, :mod:`.graph_policy`, captured steps by default, with the side stream itself on), or
    None: h on the current stream before the frozen GEMM. Only where it costs no cuBLAS workspace of 32 MiB: torch
    keeps one per (thread's handle, stream), and the forward thread's on the side stream put the graph's peak over
    PEFT's (runs 95 and 171) — so only where the backward runs on this thread too (:func:`.graph_policy.graph_step`:
    the backward's side products need that workspace anyway) or where the side stream's workspace is kept small
    (:func:`_side_blas`). Run 174 (H100, with the backward on the caller; against both off): SDXL b1 LoRA 77.30 →
    76.46 ms, SDXL b4 199.30 / 199.52, SD1.5 b8 73.01 / 72.94; run 176: SD1.5 b1 23.53 → 23.24."""
    if not graph_policy.wanted("LYCO_FORWARD_SIDE"):
        return None
    if torch._C._is_multithreading_enabled() and _side_workspace() is None:
        return None
    return side_stream(x)


#: a second side stream per CUDA device for the up's gradient (:func:`up_stream`)
_UP: dict = {}


def up_stream(t: torch.Tensor):
    """A second side stream for ``∂U`` where an op's backward computes both factor gradients
    (``LYCO_SIDE_SPLIT``, :mod:`.graph_policy`, with the side stream itself on), or None: ∂U then runs on it
    beside the ``∂h → ∂D`` chain on :func:`side_stream` instead of before it. The side stream is the backward's
    longer branch (benchmarks/NOTES.md change 69: its thin products outlast the frozen layer's ∂x), and ∂U needs
    neither ∂h nor ∂D. Same discipline as the side stream (fork before, join before the op returns), so the same
    allocator argument holds; torch keeps a cuBLAS workspace for this stream too (the backward's thread only)."""
    if (not graph_policy.wanted("LYCO_SIDE_SPLIT") or not graph_policy.wanted("LYCO_BYPASS_STREAMS")
            or t.device.type != "cuda"):
        return None
    return kept_stream(_UP, t.device)


#: torch's getters and setters of the cuBLAS and cuBLASLt workspace sizes (``torch._C``; absent in torch 2.11, run
#: 173; torch 2.13's CUDA builds declare them)
_WS_API = tuple(getattr(torch._C, "_cuda_" + n, None) for n in (
    "getCublasWorkspaceSize", "setCublasWorkspaceSize", "getCublasLtWorkspaceSize", "setCublasLtWorkspaceSize"))


def _side_workspace() -> int | None:
    """The cuBLAS workspace in bytes for the GEMMs on lyco's side streams (``LYCO_SIDE_BLAS_WORKSPACE``, MiB;
    ``torch`` leaves torch's own size), or None where this torch cannot set it."""
    v = os.environ.get("LYCO_SIDE_BLAS_WORKSPACE", "4")
    if v == "torch" or None in _WS_API:
        return None
    try:
        mib = float(v)
    except ValueError:
        mib = -1.0
    if not 0 <= mib < 2**20:  # NaN, negative and infinite sizes fail here
        raise ValueError(f"LYCO_SIDE_BLAS_WORKSPACE={v!r}: expected a size in MiB (a finite number >= 0) or 'torch'")
    return int(mib * 2**20)


@contextlib.contextmanager
def _side_blas(side, sms: bool = True):
    """cuBLAS's workspace for the block's GEMMs on ``side`` at :func:`_side_workspace`'s size, torch's sizes back
    after it.

    Why: torch keeps one cuBLAS workspace per (thread's cuBLAS handle, stream) pair, allocated at the size set at
    its first use — 32 MiB on Hopper — and holds it for the life of the process; each of lyco's two side streams
    costs a captured step one such workspace per thread that issues to it (the forward's, and autograd's device
    thread unless the backward runs on the caller, :func:`.graph_policy.graph_step`): run 174 measured the graph's
    peak over PEFT's by exactly those (NOTES session 24). The side streams run the adapter's thin products
    (rank-wide outputs; split-K partials of out × r floats), which need far less. A torch with these setters
    (2.13) records each workspace's size and allocates a larger one where a later call asks for more, so a GEMM on
    these streams outside this block stays correct. The sizes are process-wide settings: this block sets them
    only around the side regions the calling thread issues (the forward and the backward do not run at once).
    Measured (run 175, H100, one process per size through ``CUBLAS_WORKSPACE_CONFIG``: torch 2.11 there has no
    setters, run 173): the thin products summed over a step's layers take the same time at 32, 4 and 1 MiB (SDXL
    b4 19.97 / 20.03 / 19.57 ms), and SDXL b1's whole LoRA step with every workspace at 4 MiB 76.44 ms against
    76.46 at 32 (run 174) — the default 4 MiB. The peak this saves where torch has the setters is not measured.
    In a capture the block's GEMMs are also chosen for ``LYCO_SIDE_SMS`` SMs (:func:`.blas_sms.side`: fewer CTAs
    beside the frozen GEMMs; runs 305–306) — unless ``sms`` is False (a region of weight-sized GEMMs, :func:`_fork`)."""
    cuda = side is not None and getattr(side.device, "type", None) == "cuda"
    size = _side_workspace() if cuda else None
    with blas_sms.side(cuda) if sms else contextlib.nullcontext(False):
        if size is None:
            yield
            return
        get_b, set_b, get_lt, set_lt = _WS_API
        prev_b, prev_lt = get_b(), get_lt()
        set_b(min(size, prev_b))
        set_lt(min(size, prev_lt))
        try:
            yield
        finally:
            set_b(prev_b)
            set_lt(prev_lt)


@contextlib.contextmanager
def _fork(side, sms: bool = True):
    """Run the block on ``side`` after everything issued so far on the current stream (a no-op for None), cuBLAS's
    workspace there at :func:`_side_blas`'s size (and, with ``sms``, its kernels for the side's SMs in a capture).
    Every fork is joined (:func:`_join`) before the op returns; and a join never comes without a fork before it in
    the same call: in a capture, waiting on an event of a stream not yet forked into it is an error."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream(side.device))
    with torch.cuda.stream(side), _side_blas(side, sms):
        yield


def _join(side) -> None:
    """The current stream waits for what ``side`` was given so far."""
    if side is not None:
        torch.cuda.current_stream(side.device).wait_stream(side)


#: device → the side streams' work an op's backward left unjoined (:func:`_late_join`): a list of (event, captured,
#: the current stream's tensors that work reads)
_LATE: dict = {}


def _late_on(t: torch.Tensor) -> bool:
    """Whether an op's backward may leave a side stream unjoined (:func:`_late_join`): ``LYCO_LATE_JOIN``
    (:mod:`.graph_policy`; ``graph`` by default: captured steps, ``1`` everywhere, ``0`` nowhere) on a CUDA tensor.
    It acts only where the ops add the factor gradients into ``.grad`` (the trainer's grad sink;
    ``benchmarks/train_step.py --lyco-grad-sink``). Measured (H100, SD1.5 b1 LoRA, captured step): with the sink, run
    241, **22.75 / 22.87 / 22.76 ms** on / off / on; without it, where it cannot act, run 240, 22.61 / 22.61 / 22.58.
    Its correctness on the GPU: the trainer's graphs against eager with it on (runs 240–241: lora, locon, loha equal)."""
    return t.is_cuda and graph_policy.wanted("LYCO_LATE_JOIN")


def _late_join(side, keep) -> None:
    """In place of :func:`_join` at the end of an op's backward whose results do not come from ``side`` (the factor
    gradients it added into their ``.grad`` itself, :func:`_sink_into`, or the previous op's merged weight, which
    that op's :func:`_late_wait` orders): an event recorded on ``side``, which the current stream waits for at the next
    low-rank op's backward (:func:`_late_wait`) or, at the latest, when the backward pass ends (autograd's final
    callback). ``keep``: the current stream's tensors the side stream reads (∂y, h, x or its makings, the factors),
    held until then — freed earlier, the current stream could reuse their memory while the side stream still reads
    it (the allocator argument of :func:`side_stream`, with the join moved).

    Why: the frozen model's own backward between two adapted layers (a layer norm's, the attention's) waited for the
    adapter's ∂U and ∂D — which nothing there reads — before it could start: run 239's timeline of SD1.5 b1 (H100) has
    the idle before the attention backward's first kernels 0.43 ms over the floor's."""
    leave_unjoined(_LATE, side, keep, _late_wait)


def leave_unjoined(store: dict, side, keep, wait) -> None:
    """``side``'s work so far left for a later wait: an event recorded on it, kept in ``store[device]`` with
    ``keep`` (the tensors it reads, held until then), and ``wait(device)`` queued as autograd's final callback — the
    latest point the current stream waits (:func:`_late_join`; :func:`.factor_batch._tail`'s own store, waited for
    only there)."""
    st = store.setdefault(side.device, [])
    ev = torch.cuda.Event()
    ev.record(side)
    st.append((ev, torch.cuda.is_current_stream_capturing(), keep))
    dev = side.device
    torch.autograd.Variable._execution_engine.queue_callback(lambda: wait(dev))


def _late_wait(device) -> None:
    """The current stream waits for the side streams' work left unjoined (:func:`_late_join`) and the tensors it read
    are let go (:func:`wait_left`)."""
    wait_left(_LATE, device)


def wait_left(store: dict, device) -> None:
    """The current stream waits for the work :func:`leave_unjoined` kept in ``store[device]``, which is emptied. Work
    left outside a capture and found inside one (a backward that raised before its final callback) is dropped without
    a wait: a capture begins after a device synchronisation (``torch.cuda.graph``), and waiting inside a capture on an
    event recorded outside it is not allowed; work left inside a capture and found outside it belongs to a capture
    that failed."""
    st = store.get(device)
    if not st:
        return
    capturing = torch.cuda.is_current_stream_capturing()
    cur = torch.cuda.current_stream(device)
    for ev, cap, _ in st:
        if cap == capturing:
            cur.wait_event(ev)
    st.clear()


class _Ahead:
    """The weight an op's backward multiplies ∂y by for ∂x (``W + s·U·D``, or ``[W + s·U·D | U]`` where ∂h comes
    along), built ahead by the backward of the op that ran after it in the forward (:func:`_ahead_link`): autograd
    runs the backward in about the reverse of the forward's order, so that op's backward usually comes just before
    this one's. States: pending (``fn`` set, ``w`` None), built (``w`` set), spent (``fn`` None: taken by its own
    backward, built or not — a build after that would be waste, so none is started)."""

    __slots__ = ("fn", "args", "w", "__weakref__")

    def __init__(self, fn, args):
        self.fn, self.args, self.w = fn, args, None

    def build(self) -> None:
        if self.fn is not None and self.w is None:
            self.w = self.fn(*self.args)

    def take(self):
        """The weight built ahead, or None; the holder is spent (it keeps no tensor)."""
        w, self.fn, self.args, self.w = self.w, None, None, None
        return w


#: device → weak reference to the last op's :class:`_Ahead` in the forward's order (:func:`_ahead_link`)
_LAST: dict = {}


def _ahead_link(ctx, x: torch.Tensor, fn, *args) -> None:
    """Where ``LYCO_MERGE_AHEAD`` (:mod:`.graph_policy`, captured steps by default) and the ∂x an op's backward
    computes through a merged weight: ``ctx.ahead = (this op's holder, a weak reference to the previous op's)``
    — the holder builds ``fn(*args)``. The backward (:func:`_ahead_start`) starts the previous op's build on the
    up stream (:func:`up_stream`) beside its own products, and the previous op's backward takes it
    (:func:`_ahead_take`) instead of merging on its critical path. Nothing holds a holder but its own op's
    context: an op whose backward never runs takes its holder along when its graph is freed.

    Why the up stream: it carries only ∂U, the shortest of the backward's three branches after change 95; change
    69 built the merges ahead on the side stream, then the longest branch, and lost. The stream discipline is the
    side stream's (:func:`side_stream`): the W′ allocated on the up stream is read on the current stream only after
    the building op's join, and freed there after the consumer's GEMM was issued — the up stream can reuse its
    block only in a later region, whose fork orders it after that GEMM."""
    ctx.ahead = None
    if not _ahead_on(x):
        return
    mine = _Ahead(fn, args)
    ref = _LAST.get(x.device)
    _LAST[x.device] = weakref.ref(mine)
    ctx.ahead = (mine, ref)


def _ahead_on(x: torch.Tensor) -> bool:
    """Whether ops link their merged-weight builds (:func:`_ahead_link`): CUDA and ``LYCO_MERGE_AHEAD``."""
    return x.is_cuda and graph_policy.wanted("LYCO_MERGE_AHEAD")


def _ahead_take(ahead):
    """This op's weight built ahead (:func:`_ahead_link`), or None."""
    return None if ahead is None else ahead[0].take()


def _ahead_start(ahead) -> None:
    """Build the previous op's weight on the current stream (the caller's fork of the up stream) if it is still
    pending."""
    if ahead is not None and ahead[1] is not None:
        prev = ahead[1]()
        if prev is not None and prev.fn is not None and prev.w is None:
            prev.build()


class _FwdNode:
    """An op's place in the forward's order for :func:`_fwd_weights`: a weak reference to the tensor that names it (its
    first down), the call that builds its forward weights, a weak reference to the node of the op that ran after it
    in the last forward."""

    __slots__ = ("key", "build", "next", "__weakref__")

    def __init__(self, key):
        self.key, self.build, self.next = weakref.ref(key), None, None


#: id(an op's key tensor) → its :class:`_FwdNode`; device → [the node of the last op run, a list of (node, weights
#: built ahead for it, issued during a capture, the up stream's event after the build or None) or None]
_FWD_NODES: dict = {}
_FWD_STATE: dict = {}
#: the largest rank whose ops take :func:`_fwd_weights` (measured at LoRA's rank 16, run 236; LoHa's rank-64
#: Khatri–Rao form keeps its forward)
_FWD_MAX_RANK = 32


def _fwd_merged_on(x: torch.Tensor) -> bool:
    """Whether a linear layer's op forward runs through its merged weight built ahead (:func:`_fwd_weights`):
    ``LYCO_FORWARD_MERGED`` (:mod:`.graph_policy`, captured steps by default) and the up stream on x's device
    (:func:`up_stream`: CUDA; it builds them). Asked inside the op's forward, where autograd does not record (run 235
    measured nothing while this also asked for ``torch.is_grad_enabled()``): the op exists only where a gradient
    is wanted (:func:`bypass_op`)."""
    return graph_policy.wanted("LYCO_FORWARD_MERGED") and up_stream(x) is not None


#: c in :func:`_merged_pays`'s ``rows ≥ c·k`` where ``LYCO_MERGED_ROWS`` is unset and the op runs its products on the
#: side streams (captured steps); elsewhere 0 (every layer through the merged weight, as before the rule). 1 from run
#: 238 (H100: only 0 and 1 measured) to session 44; 0.75 since run 312 (H200, SDXL b1 LoRA, c = 1 / 0.75 / 2 / inf /
#: 0.75: 67.17 / 66.44 / 67.25 / 68.10 / 66.44 ms; 0.15 in run 313: 67.20). What 0.75 adds at the sizes measured:
#: SDXL b1's 1280-channel level (1024 rows, 1280 inputs: 0.8) forward and its 640-channel level's GEGLU ∂x (4096 rows,
#: 5120 outputs), SDXL b4's 1280-level ff.net.2 forward (4096 rows, 5120 inputs), SD1.5 b8's cross-attention k/v
#: forward (616 rows, 768 inputs); SD1.5 b1 none. Run 313: SDXL b1 LoKr 76.68 → 76.24, LoCon 67.36 → 66.78; SDXL b4
#: LoRA 170.76 → 170.63 (run 312), SD1.5 b8 LoRA 64.52 → 64.48 — ties; graph peaks SDXL b1 +0.11 (LoRA) and +0.14 GiB
#: (LoCon; 10.13; PEFT's LoRA 11.53 eager, H100 run 198) — by inference the merged weights of the layers it adds.
_MERGED_ROWS = 0.75


def _merged_pays(x: torch.Tensor, rows: int, k: int) -> bool:
    """Whether a linear layer's forward (``k``: its inputs) or its ∂x (``k``: its outputs; a q/k/v group's summed over
    its members) goes through a merged weight ``W′ = W + s·U·D`` at ``rows`` rows: ``rows ≥ c·k``, c from
    ``LYCO_MERGED_ROWS`` where set (a number ≥ 0; 0: always, the form before this rule; ``inf``: never), else :data:`_MERGED_ROWS`
    where the op's products run on the side streams (:func:`side_stream`), else 0.

    Why: W′ costs a pass that reads W and writes W′ (2·in·out elements) on a side stream, and the GEMM then reads W′
    instead of W; without it the current stream adds the rank-r product to the frozen GEMM's result in place — a
    read and write of the output (forward, 2·rows·out) or of ∂x (backward, 2·rows·in), ∂h coming from the side
    stream, which computes it for ∂D anyway. So the merged weight pays where rows ≥ in (forward) or rows ≥ out
    (backward), up to what the side stream hides. At SD1.5 b1 the 1280-channel level has 256 rows: run 237's timeline
    (H100) has ten builds of 24–29 µs (by their size that level's GEGLU projections, 10240 × 1280, forward and
    backward), the GEGLU kernel beside them at 26–28 µs against 7 in the floor, and the frozen GEMMs of the step
    35–67 % longer than the floor's. Run 238, c = 0 / 1: SD1.5 b1 LoRA 22.80 / 22.52 ms, SDXL b1 73.60 / 72.95,
    SD1.5 b8 69.49 / 69.28 (benchmarks/NOTES.md change 134); c = 0.75 since run 312 (:data:`_MERGED_ROWS`): a layer
    at 0.8 of the line (SDXL b1's 1280-channel level) gains more than the build costs beside the frozen GEMMs."""
    c = graph_policy.env_factor("LYCO_MERGED_ROWS", "a linear layer's merged weight where its rows ≥ that times its "
                                "inputs (forward) or outputs (∂x)")
    if c is None:
        c = _MERGED_ROWS if side_stream(x) is not None else 0.0
    return rows >= c * k


def _fwd_weights(x: torch.Tensor, key: torch.Tensor, build):
    """This op's forward weight(s) ``W + s·U·D`` — built ahead on the up stream by the op that ran before it in the
    forward where it did, else by ``build()`` here — after issuing, on the up stream, the build of the op that came
    after this one in the last forward (its node's ``build``, from the last forward). ``key``: a tensor that lives
    as long as the op's adapter and names it (its down); ``build``: a call that returns the weight(s) from the op's
    tensors at that time, or None.

    Why: in a step of few rows the device runs one kernel at a time on the forward's stream, and each adapted layer
    adds its up (an in-place ``addmm_`` after the join with its down) or the fused GEMM's longer k-loop
    (:func:`_fused_gemm`) to it; through the merged weight the forward's stream runs the frozen layer's own GEMM
    only (the down beside it on the side stream, as :func:`_forward_side`), and the build — the backward's merged
    weight (:func:`_ahead_link`) a layer earlier — runs on the up stream, idle in the forward. Numerics: the
    forward then rounds ``W + s·U·D`` to the compute dtype (the rebuild path's forward) instead of the exact
    ``x·Wᵀ + s·(x·Dᵀ)·Uᵀ``; the gradients are the bypass op's.

    With ``LYCO_FORWARD_MERGED_DEPTH`` = k > 1 (:func:`_fwd_depth`) the builds of the next k ops are kept in flight,
    each issued once, and an op waits on its own build's event instead of joining the up stream.

    Streams: the up stream's work is joined here before this op's weights are read (so the join follows the fork
    of an earlier op of the same forward, or of this one; a build issued outside a capture is not joined inside
    one: it is dropped and the weights built here), and a build this op issues for the next is read only after
    that op's join (or wait on its event); the weights are freed after the GEMM that reads them was issued, and the up stream allocates
    again only in a later fork (the side stream's allocator argument, :func:`side_stream`). A build issued for an
    op that does not come (the order changed) is joined by the next join of the up stream — this forward's next
    op, or the backward's first up-stream product."""
    st = _FWD_STATE.setdefault(x.device, [None, None])
    node = _FWD_NODES.get(id(key))
    if node is None or node.key() is not key:
        node = _FWD_NODES[id(key)] = _FwdNode(key)
    node.build = build
    last, st[0] = st[0], node
    if last is not None and last is not node:
        last.next = weakref.ref(node)
    su = up_stream(x)
    depth = _fwd_depth()
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    pend = [p for p in (st[1] or ()) if p[2] == capturing]
    st[1] = None
    mine = next((p for p in pend if p[0] is node), None)
    if depth == 1:  # one build in flight at most: the up stream joined whole (runs 235–236 measured this form)
        if pend:
            _join(su)
    elif mine is not None and mine[3] is not None:  # only this op's build waited for: the later ones run on
        torch.cuda.current_stream(x.device).wait_event(mine[3])
    # the next `depth` ops of the last forward's order: their builds kept where issued, issued where not
    want, n = [], node
    for _ in range(depth):
        n = n.next() if n.next is not None else None
        if n is None or n is node or any(n is q for q in want):
            break
        want.append(n)
    keep = [p for p in pend if p is not mine and any(p[0] is q for q in want)]
    for q in want:
        if q.key() is None or q.build is None or any(p[0] is q for p in keep):
            continue
        with _fork(su):
            built = q.build()
            ev = None
            if depth > 1 and su is not None and x.is_cuda:
                ev = torch.cuda.Event()
                ev.record(su)
        if built is not None:
            keep.append((q, built, capturing, ev))
    st[1] = keep or None
    return build() if mine is None else mine[1]


def _fwd_depth() -> int:
    """How many ops ahead :func:`_fwd_weights` builds: ``LYCO_FORWARD_MERGED_DEPTH`` (≥ 1), default 1 — measured (run
    236). Deeper, each op waits for its own build's event only (the others stay in flight on the up stream) and that
    many merged weights are alive at once: not measured."""
    d = graph_policy.env_int("LYCO_FORWARD_MERGED_DEPTH", 1, "how many ops ahead the forward's merged weights are built")
    if d < 1:
        raise ValueError(f"LYCO_FORWARD_MERGED_DEPTH={d}: expected an integer ≥ 1 (how many ops ahead the forward's "
                         "merged weights are built)")
    return d


def _fwd_reset(device) -> None:
    """A backward began: the next forward starts a new order (its first op links to no op of this step's — a build
    issued at this forward's end for the next one's first op would read the factors before the optimizer's update)
    and a build issued for an op that did not come is dropped (the up stream's next join orders it)."""
    st = _FWD_STATE.get(device)
    if st is not None:
        st[0] = st[1] = None


def _weak_build(fn, *args):
    """A call that returns ``fn(*args)``, or None once one of the tensors among them is gone: it holds the tensors by
    weak reference (a node outlives its step: it must not keep a dropped adapter's or model's weights alive), the
    other arguments as they are."""
    refs = [weakref.ref(a) if isinstance(a, torch.Tensor) else None for a in args]
    consts = [None if isinstance(a, torch.Tensor) else a for a in args]

    def build():
        vals = [c if r is None else r() for r, c in zip(refs, consts)]
        if any(r is not None and v is None for r, v in zip(refs, vals)):
            return None
        return fn(*vals)
    return build


def _merged_params(weight, down, up, s: float, cd):
    """``W + s·U·D`` in ``cd`` from a linear layer's weight and its two factors as the op receives them."""
    _, u2, d2 = _factors(down, up, cd)
    return _merged(weight, u2, d2, s, cd)


def _side_products(side, su, up, down, ahead):
    """Issue an op's backward products on its side streams (both ops' backward; the caller joins ``side`` and
    ``su`` before it returns): ``up()`` (the ∂U's) on the up stream :func:`up_stream` where there is one, then the
    previous op's merged weight ahead there (:func:`_ahead_start`); ``down()`` (∂h → ∂D) on the side stream —
    after ``up()`` on that same stream where there is no up stream. Either may be None. Returns their results.
    (Session 38's ``LYCO_AHEAD_LATE``, NOTES change 160 — ∂U's own event joined where the op returns it, the build
    after it left to its consumer — measured no gain in one run, H200 run 282: SD1.5 b1 LoRA 17.41 / 17.35 / 17.39
    ms on / off / on; taken out in session 39.)"""
    gu = gd = None
    with _fork(side if su is None else su):
        if up is not None:
            gu = up()
        if down is not None and su is None:
            gd = down()
        if su is not None:
            _ahead_start(ahead)
    if down is not None and su is not None:
        with _fork(side):
            gd = down()
    return gu, gd


def _w_in(weight, u2, d2, s: float, cd, groups: int, cat: bool, eye: int = 0, cl: bool = False) -> torch.Tensor:
    """The weight of an op's ∂x GEMM: ``W + s·U·D`` (:func:`_merged`), with ``U`` beside it where the GEMM yields
    ∂h too (:func:`_cat_pays`); ``cl``: a conv's, channels-last (:func:`_dgrad_cl`). Where the merge kernel builds
    W′ (:func:`_merge_kernel`), ``[W′ | U]`` comes out of its one launch (change 111): ``torch.cat`` after it copied
    the whole W′ once more (run 165, SDXL b1: 18.8 µs per GEGLU projection, 1280 → 10240). Run 169 (H100, the step as
    a graph, this / the cat / this): SDXL b1 LoRA 77.36 / 78.57 / 77.70 ms."""
    if cat and groups == 1 and not eye and not cl:
        wf = cast(weight, cd)
        if wf.dim() == 2 and wf.is_contiguous() and _merge_kernel(wf, d2.shape[0]):
            from .lowrank_triton import add_lowrank
            return add_lowrank(wf, u2.contiguous(), d2.contiguous(), s, with_up=True)
    w = _merged(weight, u2, d2, s, cd, groups, eye)
    if cl and w.is_contiguous(memory_format=torch.channels_last):  # built so from a channels-last W (_merged_cl)
        return w
    if cl:
        return _nhwc_copy(w) if w.is_cuda else w.contiguous(memory_format=torch.channels_last)
    return torch.cat([w, u2], 1) if cat else w


#: the attribute :mod:`lyco.models.layout` sets on a frozen conv weight its rule kept NCHW (:func:`_dgrad_cl`)
KEPT_NCHW = "_lyco_kept_nchw"


def _dgrad_cl(spec: LayerSpec, xshape, groups: int = 1, eye: int = 0, weight=None) -> bool:
    """Whether a k×k conv's ∂x runs on a channels-last merged weight, made by the tiled copy
    (:func:`.lowrank_triton.channels_last`) where the op builds it — ahead, on the up stream, where
    ``LYCO_MERGE_AHEAD`` — instead of cuDNN converting it inside the dgrad, on the critical path: where the weight
    outweighs the input per channel (positions ≤ in·∏k: SD1.5's 8×8–32×32 levels at 1280 channels), under
    ``LYCO_DGRAD_WEIGHT_CL`` (:mod:`.graph_policy`). The dgrad then takes ∂y and gives ∂x channels-last (cuDNN's
    choice for a channels-last weight): activation-sized, small where this holds.

    Measured (H100, SD1.5 b8 as one CUDA graph, floor 67.05; runs 157–158, A/B/A against the switch at 0): LoCon
    72.99 / 73.20 / 72.96 ms, LoHa 75.40 / 75.61 / 75.42, LoKr with a full W2 (the ``eye`` form) 84.48 off / 83.92
    on (run 157's first leg ran out of time there) — but LoKr's grouped low-rank op 81.84 / 81.47 / 81.81: slower,
    cause not found, so grouped downs other than the eye form keep cuDNN's conversion.

    Not for a frozen ``weight`` :mod:`lyco.models.layout` kept NCHW (``KEPT_NCHW`` set on it: its input outsizes
    it, so its neighbours run NCHW): a channels-last ∂x there is converted back around it. H100, SD1.5 b1 on that
    layout as one graph, LoCon with this switch at 0 / on (a converted weight's W′ is channels-last either way, so
    only the kept weights differ): 19.73 / 19.85 ms (run 276; 19.85 again at its end), 19.77 / 19.87 (run 277); not
    measured at b8."""
    if (spec.kind != CONV2D or spec.kernel_numel == 1 or (groups > 1 and not eye)
            or getattr(weight, KEPT_NCHW, False) or not graph_policy.wanted("LYCO_DGRAD_WEIGHT_CL")):
        return False
    return xshape[0] * xshape[2] * xshape[3] <= spec.flat_in


#: (device type, input dtype, output dtype) → whether torch's GEMMs take ``out_dtype`` there
_OUT_DTYPE: dict = {}


def _out_dtype_ok(a: torch.Tensor, dt: torch.dtype | None, scaled: bool = False, into: bool = False) -> bool:
    """Whether a GEMM of ``a``'s dtype can write ``dt`` itself (torch's ``mm``, or with ``scaled`` ``addmm`` and an
    alpha, or with ``into`` ``addmm`` adding into its ``out``, with ``out_dtype``: CUDA, bf16/fp16 in, fp32 out): an
    adapter's gradient in its parameter's fp32 straight from the GEMM's fp32 accumulator — no bf16 rounding of it and
    no cast kernel after it (400 per LoRA step under mixed precision, run 117). Probed once per combination on a 1×1
    product (a dispatch error, not a device one)."""
    if dt is None or dt == a.dtype or dt != torch.float32 or a.dtype not in (torch.bfloat16, torch.float16):
        return False
    key = (a.device.type, a.dtype, dt)
    ok = _OUT_DTYPE.get(key)
    if ok is None:
        one = a.new_ones((1, 1))
        ok = []
        acc = one.new_zeros((1, 1), dtype=dt)
        for call in (lambda: torch.mm(one, one, out_dtype=dt),
                     lambda: torch.addmm(one.new_empty((), dtype=dt), one, one, beta=0, alpha=0.5, out_dtype=dt),
                     lambda: torch.addmm(acc, one, one, beta=1, alpha=0.5, out_dtype=dt, out=acc)):
            try:
                ok.append(call().dtype == dt)
            except (RuntimeError, TypeError, NotImplementedError):
                ok.append(False)
        ok = _OUT_DTYPE[key] = tuple(ok)
    return ok[2] if into else ok[1] if scaled else ok[0]


def _engine_accumulates(p: torch.Tensor) -> bool:
    """Whether the backward pass running now accumulates into ``p.grad`` (autograd's engine will run p's
    AccumulateGrad node): false for ``torch.autograd.grad`` and for ``.backward(inputs=…)`` without p."""
    try:
        from torch.autograd.graph import get_gradient_edge
        return bool(torch._C._will_engine_execute_node(get_gradient_edge(p).node))
    except (RuntimeError, AttributeError, ImportError):  # autograd.grad over a leaf raises: not accumulating
        return False


#: what :func:`_mm` returns where it added its product into the parameter's gradient itself
_SUNK = object()


def _sink_leaves(down: torch.Tensor, up: torch.Tensor):
    """The factors a Function may add gradients into later (:func:`.casts.step_casts`' ``grad_sink``): those that are
    parameters (leaves that require a gradient), else None; None where the sink is off."""
    if not casts.sink_on():
        return None
    return tuple(t if t.is_leaf and t.requires_grad else None for t in (down, up))


def _sink_grad(p: torch.Tensor | None) -> torch.Tensor | None:
    """``p.grad`` where an op may add p's gradient into it itself: the sink on, a dense gradient of p's shape (a view
    of the trainer's flat buffer), no hook on p (its tensor hooks and post-accumulate hooks would not see the
    gradient), and a backward pass that accumulates into p (:func:`_engine_accumulates`); else None."""
    if p is None or not casts.sink_on():
        return None
    g = p.grad
    if (g is None or g.shape != p.shape or not g.is_contiguous() or g.device != p.device or p._backward_hooks
            or getattr(p, "_post_accumulate_grad_hooks", None) or not _engine_accumulates(p)):
        return None
    return g


def _sink_into(p: torch.Tensor | None, shape2d: tuple, cd: torch.dtype) -> torch.Tensor | None:
    """``p.grad`` as the 2-D matrix a linear layer's factor gradient has, where the op may add into it
    (:func:`_sink_grad`) by a GEMM that can add ``cd`` products into the gradient's dtype."""
    g = _sink_grad(p)
    if g is None or (g.dtype != cd and not _out_dtype_ok(g.new_empty(0, dtype=cd), g.dtype, into=True)):
        return None
    return g.view(shape2d)


def _sink_add(g, into: torch.Tensor | None):
    """``g`` (a factor's finished gradient) added into ``into`` (its parameter's ``.grad``, :func:`_sink_grad`) on the
    current stream — a side stream, where the op computed g — and :data:`_SUNK` returned; ``g`` itself where there is
    no ``into`` (or g is not one of its size). For the gradients no GEMM can add into ``.grad`` itself: a conv's
    (batch-summed) and a shared-input group's downs (slices of one stacked GEMM). Autograd's accumulation would
    add them on the current stream instead, one kernel per factor between the frozen model's own kernels: 144 more
    bf16 adds in the trainer's captured step of SD1.5 LoRA than in the step that returns the gradients (run 243's
    timeline, H100: 0.20 ms exposed and 0.08 ms idle before them) — by their count (not told apart in the trace) the
    32 1×1 ``proj_in``/``proj_out`` convs' 64 factors and the q/k/v and k/v groups' 80 downs. The same
    numbers: g in the gradient's dtype first (autograd's ``like`` cast), then the add autograd's accumulation does.
    Measured (H100, SD1.5 b1, the trainer's captured step, ``train_step.py --lyco-grad-sink``): LoRA 22.75 / 22.75 /
    22.76 ms before (runs 241–242), **22.62 / 22.65** after (run 245; its step that returns the gradients 22.58 /
    22.52), LoCon 24.75 (returning them 24.66); the trainer's graphs equal eager (lora, locon)."""
    if into is None or g is None or g is _SUNK or g.numel() != into.numel():
        return g
    into.add_(like(g, into.shape, into.dtype))
    return _SUNK


def _merge_kernel(w: torch.Tensor, r: int) -> bool:
    """Whether :func:`_merged` builds ``W + s·U·D`` with :func:`.lowrank_triton.add_lowrank` — one pass that reads W
    and writes W′, where ``addmm`` copies W into its output and then runs a GEMM that reads and writes it again
    (run 81's LoRA profile has 176 device-to-device copies per step, as many as its layers that merge this way —
    attributed to ``addmm`` by that count, not traced): ``LYCO_MERGE_KERNEL``
    (:mod:`.graph_policy`, captured steps by default — a Triton launch binds its arguments in Python, host time an
    eager step pays per layer), and the kernels' own conditions (CUDA, bf16/fp16, rank ≤ 64, their self-test). Both
    accumulate U·D in fp32 and round ``W + s·U·D`` once. H100, SD1.5 b8 as one graph (run 97, NOTES change 68):
    LoRA 76.8 → 76.5 ms, LoCon 82.0 → 81.3, LoHa 83.5 → 82.8; LoKr's grouped form (change 74, run 104)
    87.1 → 86.9."""
    if not graph_policy.wanted("LYCO_MERGE_KERNEL"):
        return False
    from . import lowrank_triton
    return lowrank_triton.usable(w, r)


#: the shapes :func:`_fused_gemm` takes: at least this many rows (positions), at most these output and input widths
#: (8192 rows and 1280 inputs until run 160 timed the other sizes' shapes: 1024 × 640 → 640 0.62× the three kernels,
#: 4096 × 320 → 320 0.66×, 16384 × 2560 → 640 0.83×; 1280 outputs no gain at 1024–4096 rows, 5120 inputs 1.23×)
_FUSED_ROWS, _FUSED_OUT, _FUSED_IN = 1024, 640, 2560


def _fused_gemm(x: torch.Tensor, spec: LayerSpec, r: int) -> bool:
    """Whether a linear layer's op forward is one Triton GEMM (:func:`.lowrank_gemm.fused_linear`: the frozen
    product, the down accumulated in the same k-loop, the up and the bias in its epilogue) instead of cuBLAS's
    frozen GEMM, a thin down GEMM and an in-place up: ``LYCO_FUSED_GEMM`` (:mod:`.graph_policy`, captured steps by
    default — a launch binds six tensor descriptors in Python), the kernel's own conditions, and the shapes where
    it was measured faster (module doc of :mod:`.lowrank_gemm`): ≥ 1024 rows, ≤ 640 output and ≤ 2560 input
    channels (SD1.5 b8: the 64×64 and 32×32 levels' attention projections and the 64×64 level's feed-forward
    output; SD1.5 b1 the same levels; SDXL the 64×64 level's), rank ≤ 32 (measured at rank 16; LoHa's rank-64
    Khatri–Rao form stays on the three kernels). Asked only where the forward through merged weights built ahead
    (:func:`_fwd_weights`, change 133) is not taken — which, for these ranks, it is in captured steps with the up
    stream on."""
    if not (x.shape[0] >= _FUSED_ROWS and spec.out_dim <= _FUSED_OUT and spec.in_dim <= _FUSED_IN and r <= 32
            and graph_policy.wanted("LYCO_FUSED_GEMM")):
        return False
    from . import lowrank_gemm
    return lowrank_gemm.usable(x)


def _fused_linear(x, spec: LayerSpec, w, b, d2, u2, s: float, h=None):
    """``(y, h)`` of a linear layer's op forward by :func:`.lowrank_gemm.fused_linear` (h written into the given
    ``h`` where there is one) where :func:`_fused_gemm` takes the layer and the kernel its operands; else None."""
    if not _fused_gemm(x, spec, d2.shape[0]):
        return None
    from . import lowrank_gemm
    if not lowrank_gemm.supports(x, w, b, d2, u2, h):
        return None
    return lowrank_gemm.fused_linear(x, w, b, d2, u2, s, h)


def _conv_epilogue(x: torch.Tensor, spec: LayerSpec) -> bool:
    """Whether the op's conv forward adds the adapter's up and the layer's bias in one Triton pass
    (:func:`.lowrank_triton.up_add`) instead of torch's bias pass after the cuDNN conv (a broadcast add that reads
    and writes the output: run 72's profile, 28–30 µs of a 64×64 conv's 130–470) and an in-place ``baddbmm``:
    ``LYCO_CONV_EPILOGUE`` (:mod:`.graph_policy`, captured steps by default) and the kernel's own conditions."""
    if not graph_policy.wanted("LYCO_CONV_EPILOGUE"):
        return False
    from . import lowrank_triton
    return lowrank_triton.up_add_ok(x, x.numel() // x.shape[1] * spec.out_dim)


def _nhwc_copy(x: torch.Tensor) -> torch.Tensor:
    """x channels-last, by :func:`.lowrank_triton.channels_last` (one tiled copy)."""
    from .lowrank_triton import channels_last
    return channels_last(x)


def _weight_cl(w: torch.Tensor) -> torch.Tensor:
    """A conv weight channels-last for a conv over a channels-last input — torch's cuDNN conv makes the weight
    channels-last itself (``weight.contiguous(memory_format)``, a strided elementwise copy), here by the tiled copy
    (:func:`.lowrank_triton.channels_last`) where ``LYCO_CONV_WEIGHT_CL`` (:mod:`.graph_policy`, captured steps by
    default). Run 141's LoCon profile: 226 copy kernels more than LoRA's, +1.8 ms; the frozen 3×3 weights are the
    largest of the tensors copied (SD1.5: 541 M elements, 1 GiB per forward) — the floor's cuDNN converts them with
    its own tiled kernel. Run 142: LoCon 75.43 → 75.02–75.06 ms with this copy."""
    if w.is_contiguous(memory_format=torch.channels_last) or not graph_policy.wanted("LYCO_CONV_WEIGHT_CL"):
        return w
    return _nhwc_copy(w)


#: grouped downs take :func:`_taps_down` where z's row (groups·k²·r fp32) is at most this many times x's channels
_TAPS_GROUPED_WIDTH = 2


def _taps_down(spec: LayerSpec, x: torch.Tensor, d: torch.Tensor, groups: int = 1) -> torch.Tensor | None:
    """A conv adapter's down ``h = conv(x, D)`` over the channels-last input as one GEMM over the positions —
    ``z = x·[D_t]ᵀ``, the r·k² per-tap products in fp32 (``mm`` with ``out_dtype``) — and the tap sum of
    :func:`.lowrank_triton.tap_sum` (fp32, rounded once, h NCHW), where ``LYCO_TAPS_DOWN`` (:mod:`.graph_policy`,
    captured steps by default) and the layer is a stride-1, dilation-1, zero-padded 2-D conv; else None
    (cuDNN's conv). cuDNN ran the r-output conv as implicit GEMMs tiled 64 outputs wide (run 141's profile: ``…tilesize64x64x64…``),
    8× the rank's multiply-adds (runs 142–143: 32 µs at 8 × 320 × 64², 13–36 µs at 16×16 and 8×8, where the frozen
    conv is short); the GEMM's N is r·k² = 72 (run 143: 19.9 µs there, 198 against cuDNN's 467 µs summed over
    SD1.5 b8's twelve shapes, errors equal). The layer's own conv is ungrouped; ``groups`` > 1 (LoKr's grouped down, ``D = kron(I, d)``): the channel
    groups of a position are rows of the GEMM (x channels-last viewed ``(positions·groups, C/groups)``), h's
    channels group-major — where cuDNN ran the grouped down over the NCHW x folded into the batch. z has
    groups·k²·r columns: LoKr's 8 groups of rank 16 make 1152, 3.6× a 320-channel x's bytes in fp32, and there the
    GEMM (K = C/groups = 40) and z's traffic lost to cuDNN (run 146: 8 × 320 × 64² 139.7 µs against 116.2; 640
    channels equal at 64×64, faster at 32×32; 960 and wider 1.3–3.2× faster), so a grouped down takes it only where
    z's row is at most ``_TAPS_GROUPED_WIDTH`` × the channels."""
    if not (spec.kind == CONV2D and tuple(spec.stride) == (1, 1) and tuple(spec.dilation) == (1, 1)
            and spec.groups == 1 and spec.padding_mode == "zeros" and not isinstance(spec.padding, str)
            and x.stride(1) == 1 and graph_policy.wanted("LYCO_TAPS_DOWN")):
        return None
    low = x.dtype in (torch.bfloat16, torch.float16)
    if low and not _out_dtype_ok(x, torch.float32):  # z rounded to bf16 per tap: cuDNN's conv rounds once
        return None
    from . import lowrank_triton
    n, c, hh, ww = x.shape
    r = d.shape[0]
    if groups > 1 and groups * spec.kernel_numel * r > _TAPS_GROUPED_WIDTH * c:
        return None
    if not lowrank_triton.up_add_ok(x, n * hh * ww * groups * spec.kernel_numel * r):  # z's too: int32 offsets
        return None
    cg = c // groups
    xm = x.permute(0, 2, 3, 1).reshape(-1, cg)  # a view: x is channels-last (rows: position, then group)
    dm = d.permute(2, 3, 0, 1).reshape(-1, cg)  # (tap, ρ) rows
    z = torch.mm(xm, dm.t(), out_dtype=torch.float32) if low else torch.mm(xm, dm.t())
    return lowrank_triton.tap_sum(z, n, hh, ww, r, spec.kernel, spec.pads, x.dtype, groups)


def _conv_nhwc(spec: LayerSpec, x: torch.Tensor) -> bool:
    """Whether a k×k conv (not 1×1: cuDNN runs those as GEMMs on NCHW, no conversion) takes its input
    channels-last, converted once for the frozen conv and the adapter's (with the epilogue only, whose pass writes
    the NCHW output): ``LYCO_CONV_NHWC`` (:mod:`.graph_policy`). Run 72's profile of a 64×64 3×3 conv: 9 layout
    conversions, 124 µs of its 472."""
    return spec.kernel_numel > 1 and graph_policy.wanted("LYCO_CONV_NHWC")


def _merged(w: torch.Tensor, u2: torch.Tensor, d2: torch.Tensor, s: float, dtype: torch.dtype,
            groups: int = 1, eye: int = 0) -> torch.Tensor:
    """``W + s·U·D`` in ``dtype`` (one GEMM; the GEMM accumulates in fp32 and rounds once). ``groups`` > 1: D is
    ``kron(I_groups, d2)`` (block-diagonal, never formed): W's rows are ``groups`` blocks of ``in·∏k/groups``
    columns, and block m of row o gains ``s·U[o, m-th r columns]·d2`` — one GEMM over ``out·groups`` rows of
    W's own memory (viewed, not copied, for a contiguous W). ``eye`` > 0 (``U = kron(W1, I_eye)``,
    :func:`bypass_op`): ``W + s·kron(W1, d2)``, by :func:`.factor_triton.kron_merge` where its kernels are taken —
    one pass, W1 read as a strided view of U's diagonal — where ``addmm`` copies W into its output and runs a GEMM
    whose every product but one per element is zero (run 150's profile of SD1.5's 8×8 conv: 21 + 23 µs)."""
    wf = cast(w, dtype)
    o = wf.shape[0]
    if eye:
        from . import factor_triton
        if factor_triton.kron_merge_ok(wf):
            L, m = o // eye, u2.shape[1] // eye
            w1 = u2.view(L, eye, m, eye)[:, 0, :, 0]
            return factor_triton.kron_merge(wf.view(L, eye, m, -1), w1, d2, s).view(w.shape)
    if wf.dim() == 4 and not wf.is_contiguous() and wf.is_contiguous(memory_format=torch.channels_last):
        if groups == 1:
            return _merged_cl(wf, u2, d2, s)
        if _merge_kernel(wf, d2.shape[0]) and graph_policy.wanted("LYCO_MERGE_TAPS"):
            # kron(I, D) on a channels-last W (LoKr's grouped down; the eye form's too, which kron_merge takes only
            # on a contiguous W): its rows (o, m) are not W's memory, so the kernel walks the taps
            # (lowrank_triton.add_lowrank_taps); the torch form below copies W to NCHW first. H100, SD1.5 as one
            # graph on the frozen conv layout, LoKr on / off (run 275): b1 23.04 / 23.16 / 22.93 ms, b8 75.31 / 76.45
            from .lowrank_triton import add_lowrank_taps
            o, i, kh, kw = wf.shape
            r = d2.shape[0]
            dtaps = d2.view(r, i // groups, kh * kw).transpose(1, 2).reshape(r, -1)  # (tap, channel) columns
            return add_lowrank_taps(wf, u2.reshape(o * groups, r).contiguous(), dtaps, s, groups)
    if wf.is_contiguous() and _merge_kernel(wf, d2.shape[0]):  # rows of W′ = out·groups blocks, as addmm's below
        from .lowrank_triton import add_lowrank
        return add_lowrank(wf.view(o * groups, -1), u2.reshape(o * groups, -1).contiguous(), d2.contiguous(),
                           s).view(w.shape)
    if groups > 1:
        return torch.addmm(wf.reshape(o * groups, -1), u2.reshape(o * groups, -1), d2, alpha=s).view(w.shape)
    if wf.dim() == 2:
        return torch.addmm(wf, u2, d2, alpha=s)
    return torch.addmm(wf.reshape(o, -1), u2, d2, alpha=s).view(w.shape)


def _merged_cl(wf: torch.Tensor, u2: torch.Tensor, d2: torch.Tensor, s: float) -> torch.Tensor:
    """:func:`_merged` for a channels-last conv weight (a frozen weight :mod:`lyco.models.layout` keeps that way),
    W′ channels-last too: W's memory is ``(out, kh, kw, in)``, a 2-D ``(out, kh·kw·in)`` view, so W′ is the same
    one pass over it with D's columns put in that order (a copy of the r-row D) — where the NCHW form would copy
    W to NCHW first (``reshape``) and the channels-last dgrad (:func:`_dgrad_cl`) would copy W′ back. Session 37,
    run 268 (H100, SD1.5 b1 as one graph, the layout on): LoCon 20.17 ms over a frozen step of 15.51 (4.66 ms of
    adapter, against 4.13 without the layout, run 266) before this form; 19.96 over 15.51 with it (run 269, across
    runs)."""
    o, i, kh, kw = wf.shape
    w2 = wf.permute(0, 2, 3, 1).reshape(o, kh * kw * i)  # a view: the memory's own order
    dcl = d2.reshape(-1, i, kh, kw).permute(0, 2, 3, 1).reshape(-1, kh * kw * i)
    if _merge_kernel(w2, dcl.shape[0]):
        from .lowrank_triton import add_lowrank
        out = add_lowrank(w2, u2.contiguous(), dcl.contiguous(), s)
    else:
        out = torch.addmm(w2, u2, dcl, alpha=s)
    return out.view(o, kh, kw, i).permute(0, 3, 1, 2)


def _mm(a: torch.Tensor, b: torch.Tensor, s: float, dt: torch.dtype | None = None, into=None):
    """``s·a@b`` with s in the GEMM's alpha: a ``mul_`` after it would be one more kernel per layer and step — in a
    captured step each costs its slot whatever its size (≈ 1.6 µs: run 71's smallest kernel, LoKr's 242
    ``_kron_fwd`` calls in 0.39 ms). ``beta = 0``: the (uninitialised, 0-d)
    input is never read. ``dt``: the result's dtype where the GEMM can write it (:func:`_out_dtype_ok`), else a's.
    ``into`` (:func:`_sink_into`): the product added into it by the GEMM (``beta = 1``), and :data:`_SUNK` returned."""
    if into is not None:
        if into.dtype == a.dtype:
            into.addmm_(a, b, alpha=s)
        else:
            torch.addmm(into, a, b, beta=1, alpha=s, out_dtype=into.dtype, out=into)
        return _SUNK
    if _out_dtype_ok(a, dt, s != 1.0):
        if s == 1.0:
            return torch.mm(a, b, out_dtype=dt)
        return torch.addmm(a.new_empty((), dtype=dt), a, b, beta=0, alpha=s, out_dtype=dt)
    return a @ b if s == 1.0 else torch.addmm(a.new_empty(()), a, b, beta=0, alpha=s)


def _eye_up(w1: torch.Tensor, k: int) -> torch.Tensor:
    """``kron(W1, I_k)`` ``(L·k, M·k)`` for ``W1`` ``(L, M)``: W1 written on a strided diagonal of a zero tensor (the
    bypass op's ``eye`` form)."""
    L, M = w1.shape
    u = w1.new_zeros((L, k, M, k))
    u.diagonal(dim1=1, dim2=3).copy_(w1.unsqueeze(-1).expand(L, M, k))
    return u.view(L * k, M * k)


def _factors(down: torch.Tensor, up: torch.Tensor, dtype: torch.dtype, eye: int = 0):
    """(D in its layer layout, U as (out, r), D as (r, in·∏k)), all in ``dtype`` (:func:`.casts.cast_factor`);
    ``eye`` > 0: ``up`` is ``W1`` and U is ``kron(W1, I_eye)`` (:func:`bypass_op`)."""
    r = down.shape[0]
    dd, ud = cast_factor(down, dtype), cast_factor(up, dtype)
    if eye:
        ud = _eye_up(ud, eye)
    u2 = ud if ud.dim() == 2 else ud.reshape(ud.shape[0], r)
    d2 = dd if dd.dim() == 2 else dd.reshape(r, -1)
    return dd, u2, d2


def _forward(x, spec: LayerSpec, s: float, weight, bias, down, up, cd):
    """``op(x, W + s·U·D, b)`` in the compute dtype ``cd``, x 2-D for a linear layer; also x, D and U in ``cd``."""
    xd, wd, bd = cast_input(x, cd), cast(weight, cd), cast(bias, cd)
    dd, ud = cast_factor(down, cd), cast_factor(up, cd)
    _, u2, d2 = _factors(dd, ud, cd)
    return layer_op(xd, spec, _merged(wd, u2, d2, s, cd), bd), xd, dd, ud


def _meta(x, groups, down, up, eye: int = 0) -> tuple:
    """What the backward needs of the inputs besides the saved tensors: the factors are saved in the compute dtype
    (cast once, not again in backward) and their gradients go back in the parameters' shapes and dtypes."""
    return x.shape, x.dtype, groups, (down.shape, down.dtype), (up.shape, up.dtype), eye


class _LowRankOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cfg, weight, bias, down, up):
        spec, s, cd = cfg
        y, xd, dd, ud = _forward(x, spec, s, weight, bias, down, up, cd)
        ctx.cfg = (spec, s) + _meta(x, 1, down, up)
        ctx.leaves = _sink_leaves(down, up)
        ctx.save_for_backward(xd, weight, bias, dd, ud)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        xd, weight, bias, down, up = ctx.saved_tensors
        return _grads(ctx.cfg, ctx.needs_input_grad, gy, xd, None, weight, bias, down, up, ctx.leaves)


def _grads(cfg, needs, gy, xd, h, weight, bias, down, up, leaves=None, ahead=None, split=False):
    """The backward of both ops (module doc): the Function's gradients for ``(x, cfg, weight, bias, down, up)``
    — ``h = D∗x`` as the forward kept it, or None to recompute it where ∂U needs it; ``down`` and ``up`` as the
    forward cast them (:func:`_meta`). ``groups`` > 1 (the bypass op only): ``down`` is one ``(r, in/groups[, *k])``
    matrix or kernel applied to each of the input's channel groups, i.e. ``D = kron(I_groups, down)``
    block-diagonal (never formed). The factors' gradients come out of their GEMMs in the parameters' dtype where
    the GEMM can write it (:func:`_out_dtype_ok`; a conv's batch sum reduces into it). ``leaves``
    (:func:`_sink_leaves`): on a linear layer with one group, a factor's gradient is added into its parameter's
    ``.grad`` by its GEMM where :func:`_sink_into` allows, and none is returned for it. ``ahead``: the bypass op's
    :func:`_ahead_link` — ∂x's weight as built ahead where it was, and the previous op's started here. ``split``
    (the bypass op on a linear layer with one group whose ∂D is wanted, where :func:`_merged_pays` declines): ∂x as
    ``∂y·W + s·∂h·D``, the frozen GEMM on the current stream and the rank-r product added into its result after the
    side stream's ∂h (computed there for ∂D anyway) — no merged weight."""
    spec, s, xshape, xdt, groups, (dshape, ddt), (ushape, udt), eye = cfg
    need_x, _, need_w, need_b, need_d, need_u = needs
    cd = gy.dtype
    late = _late_on(gy)
    if late:
        _late_wait(gy.device)
    dd, u2, d2 = _factors(down, up, cd, eye)
    geglu = None  # the GEGLU projection's output the bypass op took in x's place (_geglu_input)
    geglu_p = None  # the same with groups > 1: ∂p by the GEGLU's kernel alone at the end, x kept for ∂D
    if isinstance(xd, tuple) and xd[0].kind == "geglu" and groups > 1:
        geglu_p, xd = xd[1]
    if isinstance(xd, tuple):  # the bypass op's x to regenerate (.regen): by ∂D, on its stream, where it is read
        rg, kept = xd
        xc = None  # the bypass op keeps h, so ∂U does not read x; op_backward reads only its rank (no ∂W)
        if rg.kind == "geglu":
            geglu, ops = kept[0], None
        else:
            ops = _regen_operands(rg, kept, cd, spec, groups, u2.shape[1])

        def x_now():
            # what x is made of, as ∂D's kernel reads it without writing x (_grad_down), else x itself
            return ops if ops is not None else cast(rg.value(kept), cd)
    else:
        xc = cast(xd, cd)

        def x_now():
            return xc
    gx = gw = gb = gd = gu = None
    into_d = into_u = None
    add_d = add_u = None  # a conv's, a grouped linear's up: added into .grad after its products there (_sink_add)
    if leaves is not None and spec.kind == LINEAR and groups == 1:
        into_d = _sink_into(leaves[0], tuple(d2.shape), cd) if need_d else None
        into_u = _sink_into(leaves[1], tuple(u2.shape), cd) if need_u else None
    elif leaves is not None and spec.kind == LINEAR and not eye:
        # a grouped down (LoKr's kron(I, B)): ∂B's one GEMM over the groups folded into the rows adds into .grad
        # itself (_grad_down), as one group's does; its up (kron(W1, A), built) is no parameter
        into_d = _sink_into(leaves[0], tuple(d2.shape), cd) if need_d else None
        add_u = _sink_grad(leaves[1]) if need_u else None
    elif leaves is not None:
        add_d = _sink_grad(leaves[0]) if need_d else None
        add_u = _sink_grad(leaves[1]) if need_u else None
    if spec.kind != LINEAR and (need_d or need_u):
        gy = gy.contiguous()
    # the adapter's own gradients need nothing the input gradient computes — except on a wide linear layer, whose
    # ∂x GEMM yields ∂h too (_cat_pays) — so they run on the side stream while the frozen layer's ∂x runs
    split = split and spec.kind == LINEAR and need_x and need_d and not need_w and not eye
    cat = not split and spec.kind == LINEAR and need_x and need_d and not need_w and _cat_pays(spec, u2.shape[1])
    side = side_stream(gy) if (need_d or need_u) else None
    su = up_stream(gy) if side is not None and need_u and need_d else None  # ∂U beside ∂h → ∂D
    pre = _ahead_take(ahead)
    gxh = None  # cat: [∂x | ∂h/s] from one GEMM on this stream; the side stream's ∂D reads its ∂h part
    hs: list = []  # split: ∂h = ∂y·U from the side stream, for ∂x
    if not need_d or cat:
        down_fn = None
    elif geglu is not None:  # only ∂h on the side stream: ∂D comes with the GEGLU's backward after ∂x
        down_fn = lambda: gy @ u2  # noqa: E731
    elif split:
        def down_fn():
            hs.append(gy @ u2)
            return _sink_add(_grad_down(spec, s, groups, gy, x_now(), dd, d2, u2, hs[0], ddt, into_d), add_d)
    else:
        down_fn = lambda: _sink_add(  # noqa: E731
            _grad_down(spec, s, groups, gy, x_now(), dd, d2, u2, None, ddt, into_d), add_d)
    gu, gd = _side_products(
        side, su, (lambda: _sink_add(_grad_up(spec, s, gy, xc, h, dd, d2, u2.shape[1], udt, into_u, eye), add_u))
        if need_u else None, down_fn, ahead)
    if cat:
        # ∂x and ∂h/s from one GEMM over ∂y, [∂x | ∂h/s] = ∂y·[W + s·U·D | U] — ∂y, the widest tensor here, is
        # read once instead of twice; ∂x is a strided view of the result (rows in + r apart)
        gxh = gy @ (pre if pre is not None else _w_in(weight, u2, d2, s, cd, groups, True))
        gx, gh = gxh[:, :spec.in_dim], gxh[:, spec.in_dim:]
        if need_b:
            gb = gy.sum(0)
        if geglu is not None:
            gd = gh
        else:
            with _fork(side):
                gd = _grad_down(spec, s, groups, gy, x_now(), dd, d2, u2, gh, ddt, into_d)
    elif need_x or need_w or need_b:
        # one input gradient through W + s·U·D: the frozen layer's and the adapter's at once, no sum
        w_in = ((pre if pre is not None else _w_in(weight, u2, d2, s, cd, groups, False, eye,
                                                                  _dgrad_cl(spec, xshape, groups, eye, weight)))
                if need_x and not split else cast(weight, cd))
        if spec.kind == LINEAR and need_x and _out_dtype_ok(gy, xdt):
            # an input of another dtype (autocast: a norm's fp32 output) gets ∂x in it from the GEMM itself — no bf16
            # rounding and no cast kernel after it (each of q, k and v cast its ∂x for autograd's fp32 sum)
            gx = torch.mm(gy, w_in, out_dtype=xdt)
            need_x = False
        gx2, gw, gb = op_backward(spec, xc if xc is not None else gy.new_empty((0, spec.in_dim)), w_in, gy, need_x,
                                  need_w, need_b)
        gx = gx if gx2 is None else gx2
    # what the side streams read, held until the current stream waits for them where the join comes late — the wide
    # layer's [∂x | ∂h/s] too: its ∂x part goes back to autograd, which frees it on this stream while the side
    # stream's ∂D may still read ∂h (session 37: left out, the real trainer's captured SD1.5 b8 LoRA gave NaN losses
    # and a NaN ∂D in the text encoder's wide mlp.fc1 in 3 of 4 runs, H100 runs 271–272)
    keep = (gy, xd, h, weight, bias, down, up, dd, u2, d2, xc, gxh) if late else None
    if late and side is not None and (gd is None or gd is _SUNK) and not split and geglu is None:
        _late_join(side, keep)
    else:
        _join(side)
    if split:  # ∂x += s·∂h·D, rounded once more (the merged weight's path rounds W′ instead)
        gh = gd if geglu is not None else hs[0]
        if groups > 1:  # kron(I, D): each group's ∂h·D — the groups folded into the rows, ∂x written in place
            _mm(gh.view(-1, d2.shape[0]), d2, s, into=gx.view(-1, d2.shape[1]))
        else:
            _mm(gh, d2, s, into=gx)
    if geglu is not None:  # gd is ∂h here; ∂U's stream may still run beside
        gx, gd = _geglu_grads(s, gx, geglu, gd, ddt, into_d)
    elif geglu_p is not None and gx is not None:
        gx = regen_triton.geglu_input_grad(gx, geglu_p)
    if late and su is not None and (gu is None or gu is _SUNK):
        _late_join(su, keep)
    else:
        _join(su)
    if gx is not None:
        gx = like(gx, xshape, xdt)
    if gw is not None:
        gw = like(gw, weight.shape, weight.dtype)
    if gb is not None:
        gb = cast(gb, bias.dtype)
    gd = None if gd is None or gd is _SUNK else like(gd, dshape, ddt)
    gu = None if gu is None or gu is _SUNK else like(gu, ushape, udt)
    return gx, None, gw, gb, gd, gu


def _sum0(t: torch.Tensor, dt: torch.dtype | None) -> torch.Tensor:
    """``t.sum(0)``, written in ``dt`` (the sum accumulates in fp32 either way; no cast after it)."""
    return t.sum(0) if dt is None or dt == t.dtype else t.sum(0, dtype=dt)


def _bmm_sum(a: torch.Tensor, b: torch.Tensor, s: float, dt: torch.dtype | None) -> torch.Tensor:
    """``s·Σ_n a_n·b_n`` over the batch of two 3-D operands, written in ``dt``: a batched GEMM and its batch sum
    (:func:`_sum0`) — or, for a batch of one, the one GEMM (:func:`_mm`, its fp32 output from the GEMM where it can
    write it). A sum over one sample is a copy: run 212's timeline of SD1.5 b1 LoRA has 64 of them after the 1×1
    convs' factor gradients (``reduce_kernel``, 0.32 ms summed, 0.17 on the critical path)."""
    if a.shape[0] == 1:
        g = _mm(a[0], b[0], s, dt)
        return g if dt is None or g.dtype == dt else g.to(dt)
    return _sum0(_bmm(a, b, s), dt)


def _grad_up(spec: LayerSpec, s: float, gy, xc, h, dd, d2, r: int, dt=None, into=None, eye: int = 0):
    """``∂U = s·∂yᵀh`` (h recomputed from x where the op did not keep it); a conv's summed over the batch. ``dt``:
    the dtype to write it in where the GEMM or the sum can, ``into`` a linear layer's gradient to add it into
    (:func:`_mm`). ``eye`` > 0 (a conv's h kept): ``U = kron(W1, I_eye)``, and what is returned is ``∂W1[i,j] =
    Σ_k ∂U[(i,k),(j,k)] = s·Σ_n Σ_(k,p) ∂y[n,(i,k),p]·h[n,(j,k),p]`` — one batched GEMM over free views of ∂y and
    h (K = eye·positions, an L × M output per image), never the out × r ∂U (run 150's profile of SD1.5's 8×8
    conv: its GEMM and batch sum 10.7 + 26.3 µs at 1280 × 1280)."""
    if spec.kind == LINEAR:  # 2-D x and ∂y (the ops' callers flatten the leading dims outside)
        return _mm(gy.t(), F.linear(xc, d2) if h is None else h, s, dt, into)
    n, o = gy.shape[0], gy.shape[1]
    if eye:
        return _bmm_sum(gy.reshape(n, o // eye, -1), h.reshape(n, r // eye, -1).transpose(1, 2), s, dt)
    if h is None:
        h = layer_op(xc, spec, dd)
    return _bmm_sum(gy.view(n, o, -1), h.reshape(n, r, -1).transpose(1, 2), s, dt)


def _regen_operands(rg, kept, cd: torch.dtype, spec: LayerSpec, groups: int, r: int):
    """:class:`.regen_triton.Operands` where the bypass op's regenerated input (:mod:`.regen`) goes to ∂D as what
    it is made of, read by :func:`.regen_triton.weight_grad` — x never written: for a product ``x = a ⊙ b`` two passes
    of x's size fewer than the mul and a GEMM reading x, for a layer norm's output the bytes of a kept x — else None
    (x rebuilt by torch). ``LYCO_REGEN_KERNEL`` (:mod:`.graph_policy`, captured steps by default: a Triton launch
    binds its arguments in Python), a linear layer with one group, the kernels' conditions
    (:func:`.regen_triton.operands`, :func:`.regen_triton.usable`). H100, the 16 ``ff.net.2`` products of an SD1.5 b8
    step alone (run 185, ``experiments/regen_wgrad_bench.py``): cuBLAS on a kept x 0.30 ms, the mul and cuBLAS 1.43,
    this kernel 0.58; SDXL b4's 70: 1.24, 6.44, 2.64 ms. The step as a graph, kernel on / off / on (runs 186–187):
    SD1.5 b8 LoRA 73.41 / 74.30 / 73.50 ms, SDXL b4 201.35 / 204.80 / 201.15, SDXL b1 77.06 / 77.99, SD1.5 b8 LoCon
    73.18 / 74.02, LoHa 75.49 / 76.32, GLoRA 76.94 / 77.76; the trainer's graphs equal to eager (lora, locon, loha).
    A layer norm's 48 products at SD1.5 b8 (run 191): cuBLAS on a kept x 0.41 ms, this kernel 0.46."""
    if spec.kind != LINEAR or groups != 1 or not graph_policy.wanted("LYCO_REGEN_KERNEL"):
        return None
    ops = regen_triton.operands(rg.kind, rg.param, kept, cd)
    return ops if ops is not None and regen_triton.usable(ops, r) else None


def _grad_down(spec: LayerSpec, s: float, groups: int, gy, xc, dd, d2, u2, gh, dt=None, into=None):
    """``∂D = s·(∂y·U)ᵀ∗x`` (``gh``: ``∂y·U`` where the caller has it); ``groups`` as :func:`_grads`, ``dt`` and
    ``into`` (one group only) as :func:`_grad_up`. On a linear layer ``xc`` may be the operands x is made of
    (:func:`_regen_operands`)."""
    if spec.kind == LINEAR:
        gh = gy @ u2 if gh is None else gh
        if isinstance(xc, regen_triton.Operands):  # x never written: one kernel reads what it is made of
            out = regen_triton.weight_grad(gh, xc, s, dt if dt is not None else gh.dtype, into)
            return _SUNK if out is None else out
        if groups == 1:
            return _mm(gh.t(), xc, s, dt, into)
        if gh.is_contiguous() and xc.is_contiguous():  # the groups folded into the rows: one GEMM
            return _mm(gh.view(-1, d2.shape[0]).t(), xc.view(-1, d2.shape[1]), s, dt, into)
        # x a view of [x | h] (rows in + r apart): one GEMM per group, summed (then added where ``into`` is given)
        p = gh.shape[0]
        return _sink_add(_sum0(_bmm(gh.view(p, groups, -1).permute(1, 2, 0), xc.view(p, groups, -1).permute(1, 0, 2),
                                    s), dt), into)
    n, o, r = gy.shape[0], gy.shape[1], u2.shape[1]
    # ∂h as a batched GEMM with a stride-0 Uᵀ: torch.matmul((r, o), (n, o, P)) folds the batch into the
    # rows by transposing ∂y, a strided copy of the whole output gradient (run 71: two of them per conv)
    gh = _bmm(u2.t().expand(n, r, o), gy.view(n, o, -1), s).view((n, r) + tuple(gy.shape[2:]))
    if groups > 1:  # the groups folded into the batch: one kernel shared by all, its gradient summed
        xc = xc.view(n * groups, -1, *xc.shape[2:])
        gh = gh.view(n * groups, -1, *gh.shape[2:])
    gd = _triton_wgrad(xc, gh, spec, dt)
    if gd is not None:
        return gd
    if _im2col_ok(spec, r):
        return _conv_wgrad_nchw(xc, gh, spec, dt)
    return op_backward(spec, xc, dd, gh, False, True, False)[1]


def lowrank_op(x: torch.Tensor, spec: LayerSpec, weight: torch.Tensor, bias: torch.Tensor | None,
               down: torch.Tensor, up: torch.Tensor, s: float) -> torch.Tensor | None:
    """``op(x, W + s·U·D, b)`` with the backward described in the module doc; None where the layer is
    not supported (the caller takes another path)."""
    if not supports(spec, x) or torch.compiler.is_compiling():
        return None
    cd = _compute_dtype(x)
    lead = None
    if spec.kind == LINEAR and x.dim() != 2:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad or down.requires_grad
                                           or up.requires_grad or (bias is not None and bias.requires_grad)):
        y = _forward(x, spec, float(s), weight, bias, down, up, cd)[0]
    else:
        y = _LowRankOp.apply(x, (spec, float(s), cd), weight, bias, down, up)
    return y if lead is None else y.view(*lead, y.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# The bypass op (module doc): exact forward, ∂x through the merged weight, conv ∂D as an im2col of ∂h
# ----------------------------------------------------------------------------------------------------------

#: layer kinds the bypass op takes (``LYCO_BYPASS_OP_KINDS``, comma-separated; benchmarks/NOTES.md change 49)
_BYPASS_KINDS_DEFAULT = "linear,conv2d"


def bypass_wanted() -> bool:
    """The captured-steps policy for the bypass op (``LYCO_BYPASS_OP``; :mod:`.graph_policy`)."""
    return graph_policy.wanted("LYCO_BYPASS_OP")


def bypass_kinds() -> frozenset:
    """The layer kinds of ``LYCO_BYPASS_OP_KINDS``; an unknown kind is an error naming the variable (a typo would
    otherwise turn the op off without a word)."""
    raw = os.environ.get("LYCO_BYPASS_OP_KINDS", _BYPASS_KINDS_DEFAULT)
    kinds = frozenset(k.strip() for k in raw.split(",") if k.strip())
    if not kinds <= {LINEAR, CONV2D}:
        raise ValueError(f"LYCO_BYPASS_OP_KINDS={raw!r}: expected a comma-separated list of {LINEAR}, {CONV2D}")
    return kinds


def bypass_ready(spec: LayerSpec) -> bool:
    """The checks a layer host makes before building the factors: gradients on, the policy, the layer kind,
    not compiling."""
    return (torch.is_grad_enabled() and spec.kind in (LINEAR, CONV2D) and bypass_wanted()
            and spec.kind in bypass_kinds() and not torch.compiler.is_compiling())


def bypass_supports(spec: LayerSpec, x: torch.Tensor) -> bool:
    """Linear layers on 2-D rows; ungrouped zero-padded 2-D convs on a contiguous (NCHW) batched input."""
    if spec.kind == LINEAR:
        return x.dim() == 2 and x.shape[1] == spec.in_dim
    return (spec.kind == CONV2D and spec.groups == 1 and spec.padding_mode == "zeros"
            and not isinstance(spec.padding, str) and x.dim() == 4 and x.is_contiguous())


def bypass_pays(spec: LayerSpec, x: torch.Tensor, grouped: bool = False) -> bool:
    """Whether the op is faster than the delta path on this layer and input (x as :func:`bypass_supports` takes
    it). The merged weight costs about two weight-sized passes (out·in·∏k), the delta path's ∂x about four
    input-sized ones (positions·in) plus its own small GEMM/conv, so the op pays from some positions/(out·∏k)
    on. Measured per layer on SD1.5 b8 (``benchmarks/experiments/bypass_op_layers.py``, H100, forward + backward
    as CUDA graphs, the op forced on every layer). Run 72, after the conv backward stopped copying ∂y: linear
    layers and 1×1 convs gain at positions ≥ 0.96·out (0.61–0.99× the delta path's time) and lose at ≤ 0.48·out
    (1.02–1.64×); 3×3 convs gain from 0.18·out·9 on (0.75–1.00×) and lose at 0.04·out·9 (1.09–1.14×, SD1.5's
    8×8 level). So: positions ≥ out on linear layers and 1×1 convs, positions ≥ out·∏k/8 on larger kernels — or,
    for an ungrouped adapter (``grouped``: the algorithm's ``bypass_grouped``) whose conv runs channels-last with the
    epilogue (:func:`_conv_nhwc`), positions ≥ in·∏k/24 (runs 106–107, comment below).
    (Run 66 had left 1×1 convs out — 1.13–1.30× at every shape — and drawn the conv line at out·∏k; both were the
    copy's doing.) Where the op's products run on the side streams (captured steps) the line for linear layers and
    1×1 convs is lower: positions ≥ c·out with c from :func:`_rows_factor` (0 there: every such layer)."""
    if spec.kind == LINEAR:
        return x.shape[0] > 0 and x.shape[0] >= _rows_factor(x) * spec.out_dim
    positions = x.shape[0] * x.shape[2] * x.shape[3]
    k = spec.kernel_numel
    if k == 1:
        return positions > 0 and positions >= _rows_factor(x) * spec.out_dim
    if 8 * positions >= spec.out_dim * k:
        return True
    # Channels-last with the epilogue (_conv_nhwc) the op drops cuDNN's layout conversions, fixed costs that
    # dominate at SD1.5's 8×8 level: there runs 106–107 measured it 0.93–0.95× the delta path with in = out = 1280
    # (289–297 vs 311–315 µs) and 1.00–1.02× with in = 2560 (run 106: 541 vs 531; run 107, the tiled copy: 529–531
    # vs 529–532), which this line leaves out — ungrouped adapters only (LoKr's lost by 27 µs there without it, run
    # 83, and its grouped down reads NCHW).
    return (not grouped and 24 * positions >= spec.in_dim * k and _conv_epilogue(x, spec)
            and _conv_nhwc(spec, x))


#: c in :func:`bypass_pays`'s ``positions ≥ c·out`` on linear layers and 1×1 convs (:func:`_rows_factor`): without the
#: side streams, run 72's per-layer timings (which predate them); with them, every such layer — the delta path's
#: backward is five GEMMs and a sum in a row, the op's ∂x GEMM runs beside its products. Run 164's timeline of SDXL
#: b1's LoRA step (642 of its 722 linear layers below rows ≥ out: 502 at 1024 rows against 1280 outputs, 140 k/v at
#: 77 rows — so the delta path there): 4705 kernels more than
#: the floor's, concurrency 1.02; run 165, the whole step as a graph, c = 1 / 0 / 1: LoRA 84.64 / 80.04 / 84.35 ms,
#: LoCon 85.40 / 80.93, LoHa 87.18 / 83.92, LoKr 93.18 / 91.16; SDXL b4 LoRA (cross-attention's k and v: 308 rows)
#: 202.91 / 200.22 (benchmarks/NOTES.md change 109)
_ROWS_PLAIN = 1.0
_ROWS_STREAMS = 0.0


def _rows_factor(x: torch.Tensor) -> float:
    """c of ``positions ≥ c·out`` (:func:`bypass_pays`, linear layers and 1×1 convs): ``LYCO_BYPASS_ROWS`` where
    set (a number ≥ 0; 0 takes the op on every such layer), else ``_ROWS_STREAMS`` where the op's products run on
    the side streams (:func:`side_stream`), ``_ROWS_PLAIN`` elsewhere."""
    c = graph_policy.env_factor("LYCO_BYPASS_ROWS", "the op where positions ≥ that times the layer's outputs")
    if c is not None:
        return c
    return _ROWS_STREAMS if side_stream(x) is not None else _ROWS_PLAIN


def _cat_pays(spec: LayerSpec, r: int) -> bool:
    """Whether a linear layer takes the concatenated GEMMs of :class:`_BypassOp`: forward
    ``y = [x | h]·[W | s·U]ᵀ + b`` (one GEMM with K = in + r) instead of ``f(x)`` plus an in-place
    ``y += s·h·Uᵀ``, backward ``[∂x | ∂h/s] = ∂y·[W′ | U]``. The in-place add reads and writes the output (two
    output-sized passes), the concatenation reads x and writes ``[x | h]`` (two input-sized passes) and widens the
    frozen GEMM by r/in; backward, ∂y is read once instead of twice and ∂x comes back as a strided view (its
    consumer may copy it: two input-sized passes). So it pays on layers wider out than in — SD's GEGLU projections
    (in → 8·in), 16 of the 192 layers in SD1.5's `lin` set, whose in-place add was the largest adapter kernel of
    a LoRA step (run 71) — and is taken where out ≥ 2·(in + r) and the rows of ``[x | h]`` stay 16-byte aligned
    for the tensor cores ((in + r) a multiple of 8); the forward's concatenation also where the rows pay for the
    weight's copy (:func:`_cat_forward_pays`)."""
    return spec.kind == LINEAR and spec.out_dim >= 2 * (spec.in_dim + r) and (spec.in_dim + r) % 8 == 0


def _cat_forward_pays(spec: LayerSpec, rows: int, r: int) -> bool:
    """Whether a layer that :func:`_cat_pays` takes concatenates in its forward too (the backward's ``∂y·[W′ | U]``
    does not depend on it): the concatenations write ``[x | h]`` and ``[W | s·U]`` — rows·(in + r) and out·(in + r) elements,
    each read once too — where the in-place up reads and writes the output, rows·out; so they pay where
    ``rows·(out − in − r) > out·(in + r)``. The weight's copy is fixed per layer and the output's pass scales with the
    rows: at SDXL b1 (1024 rows; GEGLU's 1280 → 10240, r = 16: from 1484 rows on) run 165's timeline has the
    copy of ``[W | s·U]`` at 18.8 µs on the forward's one stream per such layer, beside a 48.6 µs GEMM; SD1.5 b8's
    layers (2048–32768 rows but the 8×8 level's 512) were where the rule was measured (run 71). Run 167 (H100, the step
    as a graph, this rule / without it / this rule): SDXL b1 LoRA 78.88 / 79.95 / 78.90 ms, LoCon 79.48 / 80.60;
    SD1.5 b8 73.47 / 73.40 / 73.43 (benchmarks/NOTES.md change 110)."""
    return rows * (spec.out_dim - spec.in_dim - r) > spec.out_dim * (spec.in_dim + r)


def _im2col_ok(spec: LayerSpec, r: int) -> bool:
    """∂D by :func:`_conv_wgrad_nchw`: a 2-D conv, stride 1, dilation 1, padding at most k − 1 on each axis, and
    the shifted copies of ∂h (r·∏k planes, r = h's channels) at most twice x's channels — else cuDNN's weight
    gradient, which converts x to NHWC instead. Runs 72 and 78 (every SD1.5 b8 layer alone, ``bypass_op_layers.py
    --algo``; the 36 3×3 convs the shape rule takes): LoCon's copies (r·9 = 72 planes) were faster on 33, LoHa's
    (144) on 34, the others within 4 µs; LoKr's (h: in_m·r = 128 channels, 1152 planes) lost on all 8 convs with
    320 input channels (5225 vs 4975 µs), and by ≈ 2 % on the three with 640 at 64×64, which this line keeps on the
    copies: a ratio alone does not separate them from the 640-channel convs at 32×32, where the copies won (3089
    vs 3246 µs over 7)."""
    if spec.kind != CONV2D:
        return False
    (ph, pw), (kh, kw) = spec.pads, spec.kernel
    return (spec.stride == (1, 1) and spec.dilation == (1, 1) and ph <= kh - 1 and pw <= kw - 1
            and r * kh * kw <= 2 * spec.in_dim)


def _triton_wgrad(x: torch.Tensor, gh: torch.Tensor, spec: LayerSpec, dt=None) -> torch.Tensor | None:
    """∂D of ``h = conv2d(x, D)`` (the layer's stride, padding and dilation; one group — a grouped down's groups are
    in the batch) by one Triton launch (:mod:`.wgrad_triton`, ``LYCO_WGRAD_KERNEL``: captured steps by default), written
    in ``dt``; None where it does not run (the caller's path then: :func:`_conv_wgrad_nchw` or cuDNN)."""
    if spec.kind != CONV2D or spec.padding_mode != "zeros":
        return None
    form = wgrad_triton.usable(x, gh, spec.kernel, spec.stride, spec.padding, spec.dilation)
    if form is None:
        return None
    return wgrad_triton.conv_wgrad(x, gh, spec.kernel, spec.stride, spec.pads, spec.dilation, dt, form=form)


def _conv_wgrad_nchw(x: torch.Tensor, gh: torch.Tensor, spec: LayerSpec, dt=None) -> torch.Tensor:
    """``∂D`` of ``h = conv2d(x, D)`` (stride 1, dilation 1, zero padding p ≤ k − 1) for ``∂h``, as one
    batched GEMM over the NCHW input in place.

    ∂D[ρ, c, ty, tx] = Σ_{n,y,x} ∂h[n, ρ, y − ty + p, x − tx + p]·x[n, c, y, x] (∂h zero outside its extent).
    With ∂h zero-padded by q = k − 1 − p on each side (∂hp), ∂h[y − ty + p] = ∂hp[y + (k − 1 − ty)]: the
    shifted copies ``cols[n, ρ, a, b, y, x] = ∂hp[n, ρ, y + a, x + b]`` (a = k − 1 − ty: taps in flipped
    order, so every stride of the view is non-negative) are one strided copy of r·k² rank-sized planes,
    and ∂D_flipped = Σ_n cols_n · x_nᵀ (rows (ρ, a, b), columns c) a batched GEMM summed over the batch (into
    ``dt`` where given; one GEMM for one sample: :func:`_bmm_sum`). The taps are put back in order and moved behind
    the channels by one ``flip`` of that contiguous (r, k², c) product written through a transposed view of a
    contiguous (r, c, kh, kw) result (``aten.flip.out``): a contiguous ∂D — which its
    consumers need (autograd's accumulation clones a gradient whose strides are not the parameter's; a 2-D
    parameter's reshape copies a strided one). (Session 35's form gathered the taps with one ``index_select`` over
    the permuted view — ``indexSelectSmallIndex``, 47 launches, 0.38 ms exposed in SD1.5 b1 LoCon's captured step,
    H100, run 260 — and two copies before that. Flipping the overlapping view of ∂h instead does not save a copy:
    flip's output keeps the view's tied strides, so the reshape copies again.) ``flip.out`` into a strided result is
    two kernels on CUDA, torch's flip into a temporary and a copy into ``out`` (run 266's makers, H100, SD1.5 b1 LoCon:
    ``aten::flip`` 18× 0.052 ms and ``aten::copy_ < aten::flip`` 18× 0.044 ms); LoCon's step was 24.54 ms there
    against 24.57 with the strided first form (run 262), across runs."""
    n, c, hh, ww = x.shape
    r = gh.shape[1]
    (kh, kw), (ph, pw) = spec.kernel, spec.pads
    qh, qw = kh - 1 - ph, kw - 1 - pw
    # contiguous: F.pad keeps a channels-last-looking layout (a 1×1 ∂h is both), the view below assumes rows
    ghp = (F.pad(gh, (qw, qw, qh, qh)) if (qh or qw) else gh).contiguous()
    hp, wp = ghp.shape[2], ghp.shape[3]
    cols = ghp.as_strided((n, r, kh, kw, hh, ww), (r * hp * wp, hp * wp, wp, 1, wp, 1)).reshape(
        n, r * kh * kw, hh * ww)
    g = _bmm_sum(cols, x.reshape(n, c, hh * ww).transpose(1, 2), 1.0, dt)  # (r·kh·kw, c), taps flipped
    if kh * kw == 1:  # no taps to reverse: (r, 1, c) is (r, c, 1, 1) already
        return g.view(r, c, 1, 1)
    # flipping both axes reverses the flattened tap index
    out = g.new_empty((r, c, kh, kw))
    torch.ops.aten.flip.out(g.view(r, kh * kw, c), [1], out=out.view(r, c, kh * kw).transpose(1, 2))
    return out


class _ConvDown(torch.autograd.Function):
    """``h = conv2d(x, D)`` — a conv adapter's down on the delta path — with ∂D by :func:`_conv_wgrad_nchw` (one
    batched GEMM over ∂h's shifted copies) where autograd's conv would run cuDNN's weight gradient: for a rank-r output
    cuDNN picks ``wgrad2d_shmem_tiling``, 23–78 µs per layer on SD1.5 b1's 16×16 and 8×8 levels (run 212's timeline,
    12 launches, 0.54 ms of LoCon's step) where the GEMM's K is only the positions (64–256). ∂x by cuDNN as before."""

    @staticmethod
    def forward(ctx, x, d, spec):
        ctx.spec = spec
        ctx.save_for_backward(x, d)
        return F.conv2d(x, d, None, spec.stride, spec.padding, spec.dilation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh):
        x, d = ctx.saved_tensors
        spec = ctx.spec
        gx = gd = None
        if ctx.needs_input_grad[0]:
            gx = op_backward(spec, x, d, gh, True, False, False)[0]
        if ctx.needs_input_grad[1]:
            xc = cast(x, gh.dtype)
            gd = _triton_wgrad(xc, gh, spec, d.dtype)
            if gd is None:
                gd = (_conv_wgrad_nchw(xc, gh, spec, d.dtype) if _im2col_ok(spec, d.shape[0])
                      else op_backward(spec, xc, d, gh, False, True, False)[1])
        return gx, gd, None


def _wgrad_kernel_likely(x: torch.Tensor, d: torch.Tensor, spec: LayerSpec) -> bool:
    """Whether :func:`_triton_wgrad` will take ∂D of ``conv(x, D)`` in the backward (decided in the forward: what
    the kernel needs of the layer, the compute dtype and the policy; ∂h's dtype is x's there)."""
    return (spec.kind == CONV2D and spec.padding_mode == "zeros"
            and wgrad_triton.likely(x, int(d.shape[0]), spec.kernel, spec.stride, spec.padding, spec.dilation,
                                    _compute_dtype(x)))


def conv_down(x: torch.Tensor, d: torch.Tensor, spec: LayerSpec, im2col: bool = True) -> torch.Tensor:
    """A conv adapter's down ``conv(x, D)`` (the layer's own stride, padding and dilation) on the delta path — LoCon's
    and LoHa's Khatri–Rao down, LoKr's grouped W2 (its groups in the batch: ``im2col`` False, the shifted copies' rule
    reads the layer's input channels): :class:`_ConvDown` on a 2-D conv where ``LYCO_CONV_DOWN_IM2COL``
    (:mod:`.graph_policy`, captured steps by default), D takes a gradient, nothing is compiling and ∂D has a faster
    path than cuDNN's weight gradient — the Triton kernel (:func:`_wgrad_kernel_likely`) or, with ``im2col``,
    the shifted copies (:func:`_im2col_ok`); else the conv of the layer's kind (cuDNN's backward)."""
    if (spec.kind == CONV2D and d.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and graph_policy.wanted("LYCO_CONV_DOWN_IM2COL")
            and ((im2col and _im2col_ok(spec, d.shape[0])) or _wgrad_kernel_likely(x, d, spec))):
        # under autocast both cast outside (differentiably, as autocast's conv would): the backward runs without
        # autocast and its products need one dtype (run 214's trainer check: fp32 weight, bf16 ∂h)
        cd = _compute_dtype(x)
        return _ConvDown.apply(x.to(cd), d.to(cd), spec)
    return _CONV_FN[spec.kind](x, d, None, spec.stride, spec.padding, spec.dilation)


class _BypassOp(torch.autograd.Function):
    """``y = op(x, W, b) + s·U·(D∗x)``; backward in the module doc."""

    @staticmethod
    def forward(ctx, x, cfg, weight, bias, down, up):
        spec, s, cd, groups, eye = cfg[:5]
        p = None
        if len(cfg) > 5:  # x is the GEGLU projection's output p, the layer's input comes detached (bypass_op)
            p, x = x, cfg[5]
        xd, wd, bd = cast_input(x, cd), cast(weight, cd), cast(bias, cd)
        uncast, catted = xd is x, False
        dd, ud = cast_factor(down, cd), cast_factor(up, cd)
        dd, u2, d2 = _factors(dd, ud, cd, eye)
        if spec.kind == LINEAR:
            # h beside the frozen GEMM on the side stream where _forward_side allows (cuBLAS's workspace there
            # shared with the backward on this thread, or kept small by _side_blas), else on this stream before it. History: on the side stream at torch's
            # 32 MiB workspace +0.03 GiB peak for −0.3 ms at SD1.5 b8 (run 95), and at SDXL b1 (run 171) LoRA
            # 77.24 → 76.5 ms with the graph's peak 11.65 → 11.68 GiB (PEFT's 11.65); by a Triton kernel there
            # instead (no workspace; run 172) SDXL b1 77.68 → 79.09 ms, SDXL b4 199.6 → 204.5 — slower than the
            # frozen GEMM beside it (benchmarks/NOTES.md 113)
            fmerged = (groups == 1 and not eye and d2.shape[0] <= _FWD_MAX_RANK and _fwd_merged_on(xd)
                       and _merged_pays(xd, xd.shape[0], spec.in_dim))
            fused = None if fmerged or groups != 1 else _fused_linear(xd, spec, wd, bd, d2, u2, s)
            if fmerged:  # through the merged weight built ahead (_fwd_weights), the down beside it
                wm = _fwd_weights(xd, down, _weak_build(_merged_params, weight, down, up, s, cd))
                fside = _forward_side(xd)
                with _fork(fside):
                    h = F.linear(xd, d2)
                y = F.linear(xd, wm, bd)
                _join(fside)
                del wm
            elif fused is not None:  # one Triton GEMM (_fused_gemm)
                y, h = fused
            else:
                rh = d2.shape[0] * (xd.shape[1] // d2.shape[1])  # h's width (groups × r)
                cat = _cat_pays(spec, rh) and _cat_forward_pays(spec, xd.shape[0], rh)
                fside = None if cat else _forward_side(xd)
                with _fork(fside):
                    if groups > 1:  # d2 on each of the rows' channel groups, the groups folded into the rows
                        h = F.linear(xd.reshape(-1, d2.shape[1]), d2).view(xd.shape[0], -1)
                    else:
                        h = F.linear(xd, d2)
                if fside is not None:  # the frozen GEMM beside the down, the up after both
                    y = layer_op(xd, spec, wd, bd)
                    _join(fside)
                    y.addmm_(h, u2.t(), alpha=s)
                elif cat:
                    # one GEMM for the frozen layer and the adapter's up (_cat_pays): y = [x | h]·[W | s·U]ᵀ + b,
                    # rounded once (the delta path rounds f(x), then the sum); only [x | h] is kept, x and h are
                    # views of it
                    xh = torch.cat([xd, h], 1)
                    y = F.linear(xh, torch.cat([wd, u2 * s], 1), bd)
                    xd, h = xh[:, :spec.in_dim], xh[:, spec.in_dim:]
                    catted = True
                else:
                    y = layer_op(xd, spec, wd, bd)
                    y.addmm_(h, u2.t(), alpha=s)
        else:
            # the adapter's conv (cuDNN) on the side stream while the frozen conv runs
            side = side_stream(xd)
            n = xd.shape[0]
            epi = _conv_epilogue(xd, spec)
            # a k×k conv in NCHW: cuDNN converts x to channels-last for each of the two convs and converts the
            # frozen conv's output back; converted once here, both convs read it (a grouped adapter's cuDNN conv
            # reads the NCHW x: its groups are views of it) and up_add's pass writes NCHW
            xin = _nhwc_copy(xd) if epi and _conv_nhwc(spec, xd) else xd
            with _fork(side):
                # over the channels-last x: one GEMM of the per-tap products and their sum (_taps_down), else cuDNN
                h = _taps_down(spec, xin, dd, groups) if xin is not xd else None
                if h is None and groups > 1:  # the kernel on each channel group, the groups folded into the batch
                    hg = layer_op(xd.view(n * groups, -1, *xd.shape[2:]), spec, dd)
                    h = hg.view(n, -1, *hg.shape[2:])
                elif h is None:
                    h = layer_op(xin, spec, dd if xin is xd else _weight_cl(dd))
            # with the epilogue the bias joins the up's pass: torch adds a cuDNN conv's bias in a pass of its own
            y = layer_op(xin, spec, wd if xin is xd else _weight_cl(wd), None if epi else bd)
            _join(side)
            if epi:
                from .lowrank_triton import up_add
                y3 = y.flatten(2)  # a view in NCHW and in channels-last
                # Rounded once, y + s·U·h + b in fp32: the delta path rounds conv(x) + b, then the sum (this
                # branch's forward is within bf16 rounding of it, no longer bit-identical; the cat path's likewise)
                y = up_add(y3, u2, h.flatten(2), s, bd, None if xin is not xd else y3).view(
                    n, -1, *y.shape[2:])
            else:
                o, r = y.shape[1], h.shape[1]
                y3 = y.view(n, o, -1)  # cuDNN's output for a contiguous NCHW input is contiguous NCHW
                y3.baddbmm_(u2.expand(n, o, r), h.view(n, r, -1), alpha=s)
        ctx.cfg = (spec, s) + _meta(x if p is None else p, groups, down, up, eye)
        ctx.leaves = _sink_leaves(down, up)
        n = ctx.needs_input_grad
        # x regenerated in backward from what its producer keeps anyway (a GEGLU's a and gelu(g)) where that
        # applies (.regen): only x's own memory is at stake, on a linear layer whose input is not cast (the cast
        # would be a tensor of the op's own) and whose weight takes no gradient (∂W would need x on the critical
        # path). Regenerated in the ∂D region that reads it; built ahead by the next op's backward on its up stream
        # instead (with the merged weight, _ahead_link) it measured the same (run 182, H100: SD1.5 b8 LoRA 73.91 /
        # 73.94 ms, SDXL b4 203.85 / 203.84): the pass costs the backward's bandwidth wherever it runs — taken out
        # A layer norm's output too (regen._find_norm: within one rounding of x; q/k/v's, attn2.to_q's and the
        # GEGLU projection's inputs). Where the forward concatenated [x | h] (_cat_forward_pays) h is kept as a copy of
        # its r columns, so that [x | h] is not kept through it.
        # Where x is a GEGLU's a ⊙ gelu(g) (bypass_op, change 120), p = [a | g] is kept and the backward runs the
        # GEGLU's own backward with ∂D in one kernel (_geglu_grads).
        if p is not None and groups > 1:
            # LoKr's kron(I, B) down (_geglu_input): x kept beside p — ∂D as any grouped down's, from x; the GEGLU's
            # kernel gives ∂p alone. x is the mul's output, which the mul's node no longer keeps gelu(g) for
            found = (regen.Regen("geglu", None, x.shape, 2), (p, x))
        elif p is not None:
            found = (regen.Regen("geglu", None, x.shape, 1), (p,))
        else:
            found = (regen.find(x, norm=True) if spec.kind == LINEAR and uncast and groups == 1 and not n[2]
                     else None)
        if found is not None and catted:
            h = h.clone()
        if found is None:
            ctx.regen = None
            ctx.save_for_backward(xd, h, weight, bias, dd, ud)
        else:
            ctx.regen = found[0]
            ctx.save_for_backward(*found[1], h, weight, bias, dd, ud)
        ctx.ahead = None
        # ∂x as ∂y·W + s·∂h·D (_grads) where the rows do not pay for the merged weight (_merged_pays)
        # — a grouped linear layer's too (LoKr's kron(I, B) down: ∂x += s·∂h·kron(I, B) as one GEMM over the groups
        # folded into the rows), where x is not regenerated. H100, SD1.5 b1 LoKr f8 (run 257's --graph-makers):
        # 35 builds of the 16×16 level's 1280 × 1280 merged weights at 256 rows, 0.27 ms, and 7 at 64 rows
        ctx.split = (spec.kind == LINEAR and (groups == 1 or found is None or p is not None) and not eye and n[0]
                     and n[4]
                     and not n[2] and not _merged_pays(xd, xd.shape[0], spec.out_dim))
        if n[0] and not n[2] and not ctx.split:  # ∂x through the merged weight (_grads): its build can come ahead
            cat = spec.kind == LINEAR and n[4] and _cat_pays(spec, u2.shape[1])
            _ahead_link(ctx, xd, _w_in, weight, u2, d2, s, cd, groups, cat, eye,
                        spec.kind != LINEAR and _dgrad_cl(spec, x.shape, groups, eye, weight))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        _fwd_reset(gy.device)
        saved = ctx.saved_tensors
        rg = ctx.regen
        if rg is None:
            xd, h, weight, bias, down, up = saved
        else:  # x as the pair (how, what) the side stream's ∂D rebuilds it from (_grads)
            xd, (h, weight, bias, down, up) = (rg, saved[:rg.n]), saved[rg.n:]
        ahead, ctx.ahead = ctx.ahead, None
        return _grads(ctx.cfg, ctx.needs_input_grad, gy, xd, h, weight, bias, down, up, ctx.leaves, ahead, ctx.split)


def bypass_op(x: torch.Tensor, spec: LayerSpec, weight: torch.Tensor, bias: torch.Tensor | None,
              down: torch.Tensor, up: torch.Tensor, s: float, groups: int = 1, eye: int = 0) -> torch.Tensor | None:
    """``op(x, W, b) + s·U·(D∗x)`` (x: 2-D rows for a linear layer) with the backward of the module doc;
    None where the op does not apply (the caller takes the delta path): the layer or input unsupported
    (:func:`bypass_supports`; the caller checked :func:`bypass_ready`), or no gradient to compute.
    ``groups`` > 1: ``down`` ``(r, in/groups[, *k])`` acts on each channel group — ``D = kron(I, down)``, h's
    channels group-major (LoKr's low-rank W2). ``eye`` > 0 (a conv with ``groups`` > 1; LoKr's full W2): ``up`` is
    ``W1`` ``(out/eye, groups)`` and ``U = kron(W1, I_eye)`` (r = eye), built inside the op; its gradient is ∂W1,
    computed without the out × r ∂U (:func:`_grad_up`)."""
    if not bypass_supports(spec, x) or (groups > 1 and x.shape[1] % groups):
        return None
    if eye and (spec.kind != CONV2D or up.dim() != 2 or up.shape[1] != groups or down.shape[0] != eye
                or up.shape[0] * eye != spec.out_dim):
        raise ValueError(f"bypass_op(eye={eye}): expected a conv, W1 ({spec.out_dim // max(eye, 1)}, {groups}) and "
                         f"a down of {eye} rows; got {spec.kind}, W1 {tuple(up.shape)}, down {tuple(down.shape)}")
    if not (x.requires_grad or weight.requires_grad or down.requires_grad or up.requires_grad
            or (bias is not None and bias.requires_grad)):
        return None
    # under autocast (lyco train's mixed precision: a bf16/fp16 base, fp32 adapter) every operand is cast to the
    # dtype autocast would compute the layer in, as the rebuild op does; the gradients go back in each input's dtype
    cfg = (spec, float(s), _compute_dtype(x), int(groups), int(eye))
    p = _geglu_input(x, spec, weight, down, groups, eye, cfg[2])
    if p is not None:  # the op's input edge goes to the GEGLU projection's output: x's own nodes never run
        return _BypassOp.apply(p, cfg + (x.detach(),), weight, bias, down, up)
    return _BypassOp.apply(x, cfg, weight, bias, down, up)


def _geglu_input(x: torch.Tensor, spec: LayerSpec, weight: torch.Tensor, down: torch.Tensor, groups: int, eye: int,
                 cd: torch.dtype) -> torch.Tensor | None:
    """The GEGLU projection's output the bypass op takes as its input in x's place (:func:`.regen.find_geglu`,
    change 120), else None: a linear layer (a grouped down too, below) whose input is in the compute dtype and takes
    a gradient,
    whose weight does not (∂W would need x) and whose down does (∂D is what the fused kernel adds to the GEGLU's
    backward), where :func:`.regen_triton.geglu_usable` holds — without the kernel the torch form of the same
    backward (:func:`_geglu_grads`) would only add GELU's recomputation. H100, captured steps, on / off (runs 197–198,
    benchmarks/NOTES.md change 120): SD1.5 b8 LoRA 69.98 / 73.26 ms, LoCon 69.92 / 73.10, LoHa 72.86 / 75.39; SDXL b4
    LoRA 187.56 / 201.23, SDXL b1 73.92 / 77.69; the peaks −0.67 GiB (SD1.5 b8) and −3.1 GiB (SDXL b4)."""
    if spec.kind != LINEAR or eye or x.dtype != cd or weight.requires_grad or not down.requires_grad:
        return None
    # groups > 1 (LoKr's kron(I, B) down): the kernel gives ∂p alone (its ∂D is one matrix over the rows, not the
    # groups' sum), x is kept for ∂D — the GEGLU's three backward nodes (GELU's, the mul's, the split's cat) become
    # one kernel; the mul no longer keeps gelu(g). Run 260 (H100, SD1.5 b1 LoKr f8, eager profile of the captured
    # step's code, over floor-geglu's): GELU's backward 0.22 ms, the mul's 0.13, the split's cat 0.11 summed over the widths
    return regen.geglu_input(x, down.shape[0] if groups == 1 else 1)


def _geglu_grads(s: float, gx: torch.Tensor, p: torch.Tensor, gh: torch.Tensor, ddt, into):
    """``(∂p, ∂D)`` for the bypass op whose input is a GEGLU projection's output p (:func:`_geglu_input`): from ∂x
    (the op's input gradient through ``W + s·U·D``) and ``∂h = ∂y·U`` — by :func:`.regen_triton.geglu_backward`, one
    pass, or where it cannot run now torch's own backward of the GEGLU (:func:`.regen_triton.geglu_torch`, bit for
    bit what autograd's nodes would give) and ∂D on the rebuilt x. ∂D as :func:`_mm` gives it (:data:`_SUNK` where
    added into ``into``)."""
    p2 = p.reshape(-1, p.shape[-1])
    if regen_triton.geglu_usable(p2, gh.shape[1]):
        gp, gd = regen_triton.geglu_backward(gx, p2, gh, s, ddt if ddt is not None else gh.dtype, into)
        return gp, (_SUNK if gd is None else gd)
    gp, x = regen_triton.geglu_torch(gx, p2)
    return gp, _mm(gh.t(), x, s, ddt, into)

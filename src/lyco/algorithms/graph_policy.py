"""Paths meant for training steps captured as CUDA graphs, and the switch that selects them.

Some fast paths trade host time for device time: a Triton launch binds its arguments in Python, a
hand-written autograd backward runs Python per layer. Where a step is issued eagerly the host is the
bottleneck on every machine measured (benchmarks/NOTES.md, changes 47–49), so those paths lose there what
they win on the device; in a step captured as a CUDA graph the host's cost is paid once, at capture. Each
such path has an environment variable with three values:

* ``graph`` (default, also when unset): only inside :func:`graph_step` — the steps a caller is about to
  capture (lyco's trainer wraps its warm-up and capture in it, ``benchmarks/train_step.py`` its graph column);
* ``1``: everywhere (``benchmarks/check_cuda_graph.py`` sets it so that its eager and captured runs compute
  the same thing, bit for bit);
* ``0``: nowhere.

The paths: LoHa's/LoKr's factor kernels (``LYCO_FACTOR_KERNELS``, :mod:`.factor_triton`), the low-rank
bypass op (``LYCO_BYPASS_OP``, :mod:`.lowrank`) and its side stream for the adapter's own products
(``LYCO_BYPASS_STREAMS``, :func:`.lowrank.side_stream`; the rebuilt op's weight gradient there too where its build
asks for it — LoKr's —, ``LYCO_REBUILD_STREAMS``, :func:`.rebuild._side`, its GEMMs chosen for the side's SMs
as the thin products are, ``LYCO_REBUILD_SIDE_SMS``, :func:`.rebuild._side_sms`, and forked before the rebuild
of W′ where it does not read it, ``LYCO_REBUILD_EARLY_FORK``, :func:`.rebuild._early_fork`; the stream's events
and a Python context per region are host time an eager step would pay per layer, and the overlap needs the graph's
concurrent branches) with a second
one for ∂U (``LYCO_SIDE_SPLIT``, :func:`.lowrank.up_stream`) that also builds the next backward's merged weight
ahead (``LYCO_MERGE_AHEAD``, :func:`.lowrank._ahead_link`) and whose work the current stream may wait for only at the
next op's backward (``LYCO_LATE_JOIN``, :func:`.lowrank._late_join`) — a batched factor product's backward
(LoKr's and LoHa's ups, :mod:`.factor_batch`) on a tail stream waited for only when the backward ends, where the
trainer's grad sink takes its gradients (``LYCO_FACTOR_TAIL``, :func:`.factor_batch._tail`) —, and its merged
weight by a Triton kernel (``LYCO_MERGE_KERNEL``, :func:`.lowrank._merge_kernel`; a grouped down's on a channels-last
weight too, ``LYCO_MERGE_TAPS``, :func:`.lowrank_triton.add_lowrank_taps`), a linear layer's forward as
one Triton GEMM on Hopper (``LYCO_FUSED_GEMM``, :func:`.lowrank._fused_gemm`) — or through its merged weight built a
layer ahead on the up stream (``LYCO_FORWARD_MERGED``, :func:`.lowrank._fwd_weights`, taken first) — or with its down
beside the frozen GEMM on the side stream (``LYCO_FORWARD_SIDE``, :func:`.lowrank._forward_side`), its conv forward's bias and up
in one Triton pass (``LYCO_CONV_EPILOGUE``, :func:`.lowrank._conv_epilogue`) and a k×k conv's input channels-last
(``LYCO_CONV_NHWC``, :func:`.lowrank._conv_nhwc`) with its weights made channels-last by the same tiled copy
(``LYCO_CONV_WEIGHT_CL``, :func:`.lowrank._weight_cl`; its ∂x's merged weight too where the weight outweighs the
input, ``LYCO_DGRAD_WEIGHT_CL``, :func:`.lowrank._dgrad_cl`) and its adapter's down as one GEMM and a tap sum
(``LYCO_TAPS_DOWN``, :func:`.lowrank._taps_down`); a conv adapter's down on the delta path with ∂D by one batched
GEMM (``LYCO_CONV_DOWN_IM2COL``, :func:`.lowrank.conv_down`) — or by one Triton launch where its shape rule takes the
down, the bypass op's and the delta path's (``LYCO_WGRAD_KERNEL``, :mod:`.wgrad_triton`) — and its up into a channels-last frozen conv's output
by batched GEMMs over the positions (``LYCO_ACC_CL``, :func:`.base.accumulate_conv1x1`); the layers that read one input as one op
(``LYCO_SHARED_INPUT``, :mod:`lyco.siblings`); (IA)³'s output mode keeping the output, its gradient from it by
two Triton launches (``LYCO_IA3_KEEP_OUTPUT``, :func:`.ia3._keep_output`; on pointwise convs too with
``LYCO_IA3_KEEP_OUTPUT_CONV``, :class:`.ia3._KeepOutputConv`), and its output-scale weights
``W + s·(W ⊙ w)`` in one Triton launch each (``LYCO_IA3_ROWS_KERNEL``, :func:`.scale_triton.rows_usable`) — or its
output and ∂y scaled instead where they are the smaller (``LYCO_IA3_SCALE_OUTPUT``, :func:`.ia3._scale_output`) —, and a
GEGLU projection's ∂w from the column sums the GEGLU's kernel forms (``LYCO_IA3_GEGLU_SUMS``, :func:`.ia3._link`);
Diag-OFT keeping a linear layer's output, its rotation's gradient from the block Gram of ∂y and y by one Triton launch
(``LYCO_OFT_KEEP_OUTPUT``, :func:`.oft._keep_output`) and its rows' rotation and Cayley backward in one Triton launch
each (``LYCO_OFT_KERNELS``, :func:`.oft_triton.kernels_usable`); and the bypass op's linear input
regenerated in backward from what its producer keeps (a GEGLU's operands; ``LYCO_INPUT_REGEN``, :mod:`.regen` —
``1`` by default: in eager steps LoRA's down takes it too, where the step waits on the host and its time stayed
within the eager noise, run 183), a layer norm's output likewise (``LYCO_NORM_REGEN``, :func:`.regen._find_norm`;
outputs of ``LYCO_NORM_REGEN_MIN`` elements or more, :func:`.regen.norm_regen_min`), and ∂D then read by one Triton kernel from what x is made of (``LYCO_REGEN_KERNEL``,
:func:`.lowrank._regen_operands`), or, where x is a GEGLU's ``a ⊙ gelu(g)``, the GEGLU's backward run by the bypass
op in the kernel that forms ∂D (``LYCO_GEGLU_FUSE``, :func:`.regen.find_geglu`). And one setting that is not a path:
the backward on the calling thread inside :func:`graph_step` (``LYCO_CALLER_BACKWARD``; ``1`` acts as ``graph``
there — outside a graph step torch's threads stay).
"""

from __future__ import annotations

import contextlib
import os

import torch

#: depth of :func:`graph_step` blocks (a list: mutable module state)
_DEPTH = [0]
MODES = ("graph", "1", "0")


@contextlib.contextmanager
def graph_step():
    """Within this block the paths under the default policy (``graph``) run: wrap the warm-up and the capture
    of a step that will be replayed as a CUDA graph. Blocks nest.

    The block also runs autograd's backward on the calling thread (``LYCO_CALLER_BACKWARD``, ``graph`` by default,
    ``0`` keeps torch's device threads; :func:`torch.autograd.set_multithreading_enabled`, thread-local): torch
    keeps one cuBLAS workspace per (thread's handle, stream) pair for the process's life (32 MiB on Hopper), and a
    step whose backward runs on autograd's device thread needs a second set of them for every stream both halves
    use — the frozen model's own stream for every model, and lyco's side streams for its adapters' products. On
    one thread the forward and the backward share them (the forward's down beside the frozen GEMM then costs no
    workspace of its own, :func:`.lowrank._forward_side`). A captured step replays without the host, so which
    thread issued it does not change its time. It applies to whatever the block runs — a peer's step in the
    benchmarks as much as lyco's."""
    caller = _DEPTH[0] == 0 and _mode("LYCO_CALLER_BACKWARD") != "0"  # a typo is an error, before the block
    threads = torch.autograd.set_multithreading_enabled(False) if caller else contextlib.nullcontext()
    _DEPTH[0] += 1
    try:
        with threads:
            yield
    finally:
        _DEPTH[0] -= 1


def in_graph_step() -> bool:
    return _DEPTH[0] > 0


def _mode(var: str, default: str = "graph") -> str:
    mode = os.environ.get(var, default)
    if mode not in MODES:
        raise ValueError(f"{var}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def wanted(var: str, default: str = "graph") -> bool:
    """Whether the path switched by the environment variable ``var`` runs here (module doc); an unknown value
    is an error naming the variable. ``default``: the mode when it is unset (``graph`` but for a path that pays in
    eager steps too)."""
    mode = _mode(var, default)
    return mode == "1" or (mode == "graph" and _DEPTH[0] > 0)


def env_factor(var: str, what: str) -> float | None:
    """The environment variable ``var`` as a number ≥ 0 (``inf`` included), or None where it is unset; anything else is
    an error naming it and ``what`` the number does — the factors of the paths' shape rules (rows ≥ c·channels)."""
    raw = os.environ.get(var)
    if raw is None:
        return None
    try:
        c = float(raw)
    except ValueError:
        c = -1.0
    if not c >= 0.0:  # NaN and negative numbers fail here
        raise ValueError(f"{var}={raw!r}: expected a number ≥ 0 ({what})")
    return c


def env_int(var: str, default: int, what: str, least: int = 0) -> int:
    """``default``, or the environment variable ``var`` where set (an error naming it and what it counts if it is not
    an integer of at least ``least``: every caller's is a count or a size) — the numeric settings beside the paths'
    switches (e.g. the narrowest layer a path takes)."""
    env = os.environ.get(var)
    if env is None:
        return default
    try:
        value = int(env)
    except ValueError:
        value = None
    if value is None or value < least:
        raise ValueError(f"{var}={env!r}: expected an integer ≥ {least} ({what})")
    return value

"""The bypass op's side stream (``algorithms/lowrank.py``: ``side_stream``, ``_fork``/``_join``): which products run
on it, and the ordering the allocator argument in ``side_stream``'s doc rests on — every region on the side stream
starts by waiting for the current stream, the op waits for the side stream before it returns, and never waits
on it without a fork first in the same call (in a CUDA graph capture that wait would be an error). The CPU has
no streams, so a recording stand-in replaces them; the values are checked against float64 math with the
stand-in in place. Whether two real streams race is the GPU runs' check (``benchmarks/check_cuda_graph.py``).
Also here: the op's merged weight by the Triton kernel (``LYCO_MERGE_KERNEL``), forced in on the CPU's interpreter."""

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lyco.algorithms import lowrank
from lyco.algorithms.base import LayerSpec


class _Stream:
    def __init__(self, name, log, device="cpu"):
        self.name, self.log, self.device = name, log, torch.device(device)

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")

    def wait_event(self, ev):
        self.log.append(f"{self.name} waits event {ev.n} ({ev.stream.name})")


class _Log(list):
    """The recording: a list of events (and the stand-in side stream as ``.side``)."""


@pytest.fixture
def streams(monkeypatch):
    """A recording main and side stream; ``log`` lists waits, and every product below as ``name@stream``."""
    log = _Log()
    main, side = _Stream("main", log), _Stream("side", log)
    cur = [main]

    @contextlib.contextmanager
    def on(s):
        prev, cur[0] = cur[0], s
        try:
            yield
        finally:
            cur[0] = prev

    monkeypatch.setattr(lowrank, "side_stream", lambda t: side)
    # the merged weight on every linear layer (lowrank._merged_pays would split the ∂x of these small-row layers):
    # these tests pin that path's order; test_split_backward_order the other's
    monkeypatch.setenv("LYCO_MERGED_ROWS", "0")
    log.side = side  # type: ignore[attr-defined]  (the blas fixture makes it a CUDA stand-in)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", on)

    def spy(name, fn):
        def wrapped(*a, **k):
            log.append(f"{name}@{cur[0].name}")
            return fn(*a, **k)
        monkeypatch.setattr(lowrank, name, wrapped)

    for name in ("_grad_up", "_grad_down", "_merged", "layer_op"):
        spy(name, getattr(lowrank, name))
    return log


def _check_pairs(log):
    """Every fork joined after its last side product; no join before a fork."""
    waits = [e for e in log if "waits" in e]
    assert waits, log
    assert waits[0] == "side waits main" and waits[-1] == "main waits side", log
    assert log[-1] == "main waits side", log  # nothing runs after the join, before the op returns
    forked = False
    for e in log:
        if e == "side waits main":
            forked = True
        elif e == "main waits side":
            assert forked, log


def _run(mod, x, r=4, s=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = LayerSpec.from_module(mod)
    w = mod.weight.detach().double()
    b = mod.bias.detach().double()
    k = tuple(w.shape[2:])
    down = (torch.randn((r, w.shape[1]) + k, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    up = (torch.randn((w.shape[0], r) + (1,) * len(k), generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    xx = x.clone().requires_grad_()
    y = lowrank.bypass_op(xx, spec, w, b, down, up, s)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy)
    # float64 reference from the definition: y = op(x, W + s·U·D, b)
    xr, dr, ur = (t.detach().clone().requires_grad_() for t in (x, down, up))
    wm = w + s * (ur.reshape(ur.shape[0], r) @ dr.reshape(r, -1)).reshape(w.shape)
    yr = F.linear(xr, wm, b) if w.dim() == 2 else F.conv2d(xr, wm, b, spec.stride, spec.padding)
    yr.backward(gy)
    for a, ref in ((y, yr), (xx.grad, xr.grad), (down.grad, dr.grad), (up.grad, ur.grad)):
        torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-10)


_MIB = 2**20
#: torch's sizes in the stand-in cuBLAS workspace API (Hopper's cuBLAS default; an Lt size above the side's)
_TORCH_WS = {"b": 32 * _MIB, "lt": 8 * _MIB}


@pytest.fixture
def blas(streams, monkeypatch):
    """A stand-in for torch's cuBLAS workspace-size API (``lowrank._WS_API``; the CPU build has none) that logs
    each setting as ``ws B LT`` (MiB) into the recording, and a CUDA side stream (``_side_blas`` acts on CUDA
    streams only). Returns the recording; its ``.sizes`` is the API's state."""
    sizes = dict(_TORCH_WS)

    def setter(key):
        def set_(v):
            sizes[key] = int(v)
            streams.append(f"ws {sizes['b'] / _MIB:g} {sizes['lt'] / _MIB:g}")
        return set_

    monkeypatch.setattr(lowrank, "_WS_API", (lambda: sizes["b"], setter("b"), lambda: sizes["lt"], setter("lt")))
    streams.side.device = torch.device("cuda")
    streams.sizes = sizes
    return streams


def _ws_at_products(log):
    """Each product of the recording (``name@stream``) with the workspace setting in force when it ran."""
    cur, out = f"ws {_TORCH_WS['b'] / _MIB:g} {_TORCH_WS['lt'] / _MIB:g}", []
    for e in log:
        if e.startswith("ws "):
            cur = e
        elif "@" in e:
            out.append((e, cur))
    return out


def test_linear_layer_backward_products_on_the_side_stream(streams):
    mod = nn.Linear(12, 10)
    _run(mod, torch.randn(40, 12, dtype=torch.float64))
    # forward: h and the frozen GEMM on the current stream (LYCO_FORWARD_SIDE: captured steps only by default)
    assert not any(e.endswith("@side") for e in streams[:streams.index("side waits main")]), streams
    i = streams.index("side waits main")
    assert streams[i + 1:i + 3] == ["_grad_up@side", "_grad_down@side"], streams
    assert "_merged@main" in streams[i + 3:], streams  # ∂x through the merged weight, beside them
    _check_pairs(streams)


def test_linear_layer_forward_down_on_the_side_stream(blas, monkeypatch):
    """``LYCO_FORWARD_SIDE``: the forward's down on the side stream (forked before it, under the side's small cuBLAS
    workspace), the frozen GEMM on the current one beside it at torch's, joined before the up's add — values still
    float64 math's (``_run``)."""
    monkeypatch.setenv("LYCO_FORWARD_SIDE", "1")
    _run(torch.nn.Linear(12, 10), torch.randn(40, 12, dtype=torch.float64))
    fwd = blas[:blas.index("main waits side") + 1]
    assert fwd == ["side waits main", "ws 4 8", "ws 4 4", "ws 32 4", "ws 32 8", "layer_op@main",
                   "main waits side"], fwd
    _check_pairs(fwd)
    _check_pairs(blas[len(fwd):])


def test_forward_down_stays_where_the_side_workspace_cannot_be_set(streams, monkeypatch):
    """Without torch's workspace-size API (the CPU build's ``_WS_API``), or with ``LYCO_SIDE_BLAS_WORKSPACE=torch``,
    the forward's down stays on the current stream unless the backward runs on the forward's thread: at torch's own
    32 MiB the forward thread's workspace on the side stream put the captured step's peak over PEFT's (run 171)."""
    monkeypatch.setenv("LYCO_FORWARD_SIDE", "1")
    assert lowrank._forward_side(torch.zeros(2)) is None
    # the backward on this thread (graph_step's caller backward): its side products need the workspace anyway
    with torch.autograd.set_multithreading_enabled(False):
        assert lowrank._forward_side(torch.zeros(2)) is streams.side
    assert lowrank._forward_side(torch.zeros(2)) is None
    monkeypatch.setattr(lowrank, "_WS_API", (lambda: 1, lambda v: None, lambda: 1, lambda v: None))
    assert lowrank._forward_side(torch.zeros(2)) is streams.side
    monkeypatch.setenv("LYCO_SIDE_BLAS_WORKSPACE", "torch")
    assert lowrank._forward_side(torch.zeros(2)) is None
    monkeypatch.setenv("LYCO_FORWARD_SIDE", "0")
    with torch.autograd.set_multithreading_enabled(False):
        assert lowrank._forward_side(torch.zeros(2)) is None


@pytest.mark.parametrize("mod,x", [(nn.Linear(12, 10), (40, 12)), (nn.Linear(8, 40), (30, 8)),
                                   (nn.Conv2d(6, 5, 3, padding=1), (2, 6, 7, 7))])
@pytest.mark.parametrize("ws", [None, "0", "16", "torch"])
def test_side_products_run_under_the_side_workspace(blas, split, monkeypatch, mod, x, ws):
    """``_side_blas``: every product on a side stream runs with cuBLAS's workspace at ``LYCO_SIDE_BLAS_WORKSPACE``
    (MiB, default 4; the Lt size no larger; torch's sizes where ``torch``), every product on the current stream
    at torch's, and torch's sizes are back when the op returns — forward (the down beside the frozen GEMM or the
    conv's adapter) and backward (∂U on the up stream, ∂h → ∂D on the side stream)."""
    monkeypatch.setenv("LYCO_FORWARD_SIDE", "1")
    if ws is not None:
        monkeypatch.setenv("LYCO_SIDE_BLAS_WORKSPACE", ws)
    _run(mod, torch.randn(*x, dtype=torch.float64), r=8 if mod.weight.shape[0] == 40 else 4)
    side_mib = {None: 4, "0": 0, "16": 16, "torch": None}[ws]
    want_side = "ws 32 8" if side_mib is None else f"ws {side_mib} {min(side_mib, 8)}"
    seen = _ws_at_products(blas)
    assert any(p.endswith(("@side", "@up")) for p, _ in seen), blas
    for prod, at in seen:
        assert at == (want_side if prod.endswith(("@side", "@up")) else "ws 32 8"), (prod, blas)
    assert blas.sizes == _TORCH_WS


def test_side_workspace_restored_after_an_error(blas):
    with pytest.raises(RuntimeError, match="boom"):
        with lowrank._side_blas(blas.side):
            assert blas.sizes == {"b": 4 * _MIB, "lt": 4 * _MIB}
            raise RuntimeError("boom")
    assert blas.sizes == _TORCH_WS


@pytest.mark.parametrize("bad", ["-1", "big", "nan", "inf", ""])
def test_side_workspace_variable_errors(blas, monkeypatch, bad):
    monkeypatch.setenv("LYCO_SIDE_BLAS_WORKSPACE", bad)
    with pytest.raises(ValueError, match="LYCO_SIDE_BLAS_WORKSPACE"):
        lowrank._side_workspace()


def test_wide_linear_layer_waits_for_the_shared_gemm_before_its_down_gradient(streams):
    mod = nn.Linear(8, 40)  # out ≥ 2·(in + r), (in + r) % 8 == 0: ∂h comes from the ∂x GEMM (_cat_pays)
    assert lowrank._cat_pays(LayerSpec.from_module(mod), 8)
    _run(mod, torch.randn(30, 8, dtype=torch.float64), r=8)
    bwd = streams[streams.index("side waits main"):]
    assert bwd[:2] == ["side waits main", "_grad_up@side"], bwd
    m = bwd.index("_merged@main")
    assert bwd[m + 1:m + 3] == ["side waits main", "_grad_down@side"], bwd  # ∂h is the GEMM's: after it
    _check_pairs(streams)


@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=1)])
def test_conv_adapter_forward_and_backward_on_the_side_stream(streams, kw):
    mod = nn.Conv2d(6, 5, **kw)
    _run(mod, torch.randn(2, 6, 7, 7, dtype=torch.float64))
    fwd_end = streams.index("main waits side")
    fwd = streams[:fwd_end + 1]
    # the adapter's conv h on the side stream, the frozen conv on the current one, joined before the up's add
    assert fwd == ["side waits main", "layer_op@side", "layer_op@main", "main waits side"], fwd
    bwd = streams[fwd_end + 1:]
    assert bwd[:3] == ["side waits main", "_grad_up@side", "_grad_down@side"], bwd
    _check_pairs(bwd)
    _check_pairs(fwd)


@pytest.fixture
def split(streams, monkeypatch):
    """The recording streams plus a third, ``up`` (:func:`lowrank.up_stream`: ``LYCO_SIDE_SPLIT``)."""
    up = _Stream("up", streams, streams.side.device.type)  # a CUDA stand-in too where the blas fixture came first
    monkeypatch.setattr(lowrank, "up_stream", lambda t: up)
    return streams


def _check_split(bwd):
    """∂U alone on ``up`` and ∂D alone on ``side``, each stream forked from main before its product and joined
    by main after it, before the op returns; nothing of the adapter on main."""
    for prod, st in (("_grad_up", "up"), ("_grad_down", "side")):
        on = [i for i, e in enumerate(bwd) if e.startswith(prod + "@")]
        assert len(on) == 1 and bwd[on[0]] == f"{prod}@{st}", bwd
        fork, join = bwd.index(f"{st} waits main"), len(bwd) - 1 - bwd[::-1].index(f"main waits {st}")
        assert fork < on[0] < join, bwd
    assert set(bwd[-2:]) == {"main waits side", "main waits up"}, bwd


@pytest.mark.parametrize("kind", ["linear", "wide-linear", "conv3x3"])
def test_up_gradient_on_a_second_side_stream(split, kind):
    """``LYCO_SIDE_SPLIT``: ∂U on its own stream beside the ∂h → ∂D chain (the wide layer's ∂D still after the
    shared ∂x GEMM that yields ∂h); values against float64 math (:func:`_run`)."""
    if kind == "conv3x3":
        _run(nn.Conv2d(6, 5, 3, padding=1), torch.randn(2, 6, 7, 7, dtype=torch.float64))
        bwd = split[split.index("main waits side") + 1:]  # after the forward's own fork and join
    else:
        mod, r = (nn.Linear(12, 10), 4) if kind == "linear" else (nn.Linear(8, 40), 8)
        _run(mod, torch.randn(30, mod.in_features, dtype=torch.float64), r=r)
        bwd = split[split.index("up waits main"):]
    _check_split(bwd)
    if kind == "wide-linear":
        assert bwd.index("_merged@main") < bwd.index("_grad_down@side"), bwd
    else:  # ∂D does not wait for ∂x's GEMM
        assert bwd.index("_grad_down@side") < bwd.index("_merged@main"), bwd


@pytest.mark.parametrize("wide", [False, True])
def test_split_backward_order(split, monkeypatch, wide):
    """``lowrank._merged_pays`` declining (30 rows against 40 outputs, c = 1): no merged weight anywhere; ∂x's frozen
    GEMM on main beside the side stream's ∂h → ∂D, and the rank-r product added into ∂x on main only after main
    waited for the side stream (the wide layer too: no ``[W′ | U]``). Values against float64 math (:func:`_run`)."""
    monkeypatch.setenv("LYCO_MERGED_ROWS", "1")
    real = lowrank._mm

    def mm(*a, **k):
        split.append("_mm into" if k.get("into") is not None else "_mm")
        return real(*a, **k)

    monkeypatch.setattr(lowrank, "_mm", mm)
    mod, r = (nn.Linear(8, 40), 8) if wide else (nn.Linear(12, 40), 4)
    _run(mod, torch.randn(30, mod.in_features, dtype=torch.float64), r=r)
    bwd = split[split.index("up waits main"):]
    assert not any(e.startswith("_merged@") for e in split), split
    _check_split([e for e in bwd if not e.startswith("_mm")])
    add = bwd.index("_mm into")
    assert bwd.index("_grad_down@side") < bwd.index("main waits side") < add, bwd


def test_up_stream_policy(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("LYCO_BYPASS_STREAMS", "1")
    monkeypatch.setenv("LYCO_SIDE_SPLIT", "1")
    assert lowrank.up_stream(x) is None  # the CPU has no streams
    monkeypatch.setenv("LYCO_SIDE_SPLIT", "maybe")
    with pytest.raises(ValueError, match="LYCO_SIDE_SPLIT"):
        lowrank.up_stream(x)


def test_side_stream_policy(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("LYCO_BYPASS_STREAMS", "1")
    assert lowrank.side_stream(x) is None  # the CPU has no streams
    monkeypatch.setenv("LYCO_BYPASS_STREAMS", "sometimes")
    with pytest.raises(ValueError, match="LYCO_BYPASS_STREAMS"):  # a typo is an error, not the stream off
        lowrank.side_stream(x)


@pytest.mark.parametrize("kind", ["linear", "wide-linear", "conv3x3"])
def test_merged_weight_by_the_kernel_in_the_op(monkeypatch, triton_interpreter, kind):
    """``LYCO_MERGE_KERNEL``: the op's ∂x through ``W + s·U·D`` built by ``lowrank_triton.add_lowrank`` (forced in;
    Triton's interpreter on the CPU) — the kernel is called once per backward with the layer's flattened weight, and
    ∂x, ∂U, ∂D, y equal float64 math within fp32 rounding."""
    from lyco.algorithms import lowrank_triton
    calls = []
    real = lowrank_triton.add_lowrank
    monkeypatch.setattr(lowrank_triton, "add_lowrank", lambda w, u, d, s, with_up=False: calls.append(
        (tuple(w.shape), with_up)) or real(w, u, d, s, with_up))
    monkeypatch.setattr(lowrank, "_merge_kernel", lambda w, r: True)
    mod = {"linear": nn.Linear(24, 20), "wide-linear": nn.Linear(8, 40), "conv3x3": nn.Conv2d(6, 5, 3, padding=1)}[kind]
    x = torch.randn(30, mod.in_features) if kind != "conv3x3" else torch.randn(2, 6, 7, 7)
    r = 8
    spec = LayerSpec.from_module(mod)
    g = torch.Generator().manual_seed(1)
    w, b = mod.weight.detach(), mod.bias.detach()
    k = tuple(w.shape[2:])
    down = (0.3 * torch.randn((r, w.shape[1]) + k, generator=g)).requires_grad_()
    up = (0.3 * torch.randn((w.shape[0], r) + (1,) * len(k), generator=g)).requires_grad_()
    xx = x.clone().requires_grad_()
    y = lowrank.bypass_op(xx, spec, w, b, down, up, 0.7)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    # the wide layer's [W′ | U] (lowrank._cat_pays) comes out of the kernel's launch itself (change 111)
    assert calls == [((w.shape[0], w[0].numel()), kind == "wide-linear")]
    xr, dr, ur = (t.detach().double().requires_grad_() for t in (x, down, up))
    wm = w.double() + 0.7 * (ur.reshape(ur.shape[0], r) @ dr.reshape(r, -1)).reshape(w.shape)
    yr = F.linear(xr, wm, b.double()) if w.dim() == 2 else F.conv2d(xr, wm, b.double(), padding=1)
    yr.backward(gy.double())
    for a, ref in ((y, yr), (xx.grad, xr.grad), (down.grad, dr.grad), (up.grad, ur.grad)):
        assert ((a.double() - ref).abs().max() / ref.abs().max()).item() < 2e-5


def test_grouped_merged_weight_by_the_kernel(monkeypatch, triton_interpreter):
    """LoKr's grouped down (``groups`` = 3: ``D = kron(I_3, B)``, never formed) with the kernel forced in: one call on
    W viewed as its ``out·groups`` row blocks, and the op equal to float64 math with D formed."""
    from lyco.algorithms import lowrank_triton
    calls = []
    real = lowrank_triton.add_lowrank
    monkeypatch.setattr(lowrank_triton, "add_lowrank", lambda w, u, d, s, with_up=False: calls.append(
        tuple(w.shape)) or real(w, u, d, s, with_up))
    monkeypatch.setattr(lowrank, "_merge_kernel", lambda w, r: True)
    mod, g, r = nn.Linear(24, 20), 3, 4
    gen = torch.Generator().manual_seed(2)
    w, b = mod.weight.detach(), mod.bias.detach()
    down = (0.3 * torch.randn(r, 24 // g, generator=gen)).requires_grad_()
    up = (0.3 * torch.randn(20, g * r, generator=gen)).requires_grad_()
    x = torch.randn(30, 24, generator=gen)
    xx = x.clone().requires_grad_()
    y = lowrank.bypass_op(xx, LayerSpec.from_module(mod), w, b, down, up, 0.7, groups=g)
    gy = torch.randn(y.shape, generator=gen)
    y.backward(gy)
    assert calls == [(20 * g, 24 // g)]
    xr, dr, ur = (t.detach().double().requires_grad_() for t in (x, down, up))
    wm = w.double() + 0.7 * ur @ torch.block_diag(*[dr] * g)
    yr = F.linear(xr, wm, b.double())
    yr.backward(gy.double())
    for a, ref in ((y, yr), (xx.grad, xr.grad), (down.grad, dr.grad), (up.grad, ur.grad)):
        assert ((a.double() - ref).abs().max() / ref.abs().max()).item() < 2e-5


def _layer(g, i, o, r=4, grads=False):
    """A linear layer's ``(spec, W, b, D, U, s)`` in float64 from ``g``, the factors leaves that take a gradient
    (``grads``: with a zero ``.grad`` already)."""
    w = torch.randn(o, i, generator=g, dtype=torch.float64) / i ** 0.5
    b = torch.randn(o, generator=g, dtype=torch.float64)
    d = (0.3 * torch.randn(r, i, generator=g, dtype=torch.float64)).requires_grad_()
    u = (0.3 * torch.randn(o, r, generator=g, dtype=torch.float64)).requires_grad_()
    if grads:
        d.grad, u.grad = torch.zeros_like(d), torch.zeros_like(u)
    return LayerSpec.from_module(nn.Linear(i, o)), w, b, d, u, 0.6


def _chain(seed, grads=False):
    """A → G (a q/k/v group of three) → B: the layers (:func:`_layer`, ``grads`` as there), an input x (30, 12) and
    the output's gradient gz (30, 10), float64 from one generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    A, B = _layer(g, 12, 16, grads=grads), _layer(g, 16, 10, grads=grads)
    G = [_layer(g, 16, 16, grads=grads) for _ in range(3)]
    x = torch.randn(30, 12, generator=g, dtype=torch.float64, requires_grad=True)
    gz = torch.randn(30, 10, generator=g, dtype=torch.float64)
    return A, B, G, x, gz


def _chain_run(A, B, G, x, gz, grouped=True):
    """``run(lin, grp)`` for :func:`_against_dense`: the chain A → G → B (A → B where not ``grouped``) with
    ``lin(layer, t)`` and ``grp(t)``, the backward of ``(z·gz).sum()``, z returned."""
    def run(lin, grp):
        t = lin(A, x)
        if grouped:
            q, k, v = grp(t)
            t = q + k * v
        z = lin(B, t)
        (z * gz).sum().backward()
        return z.detach()
    return run


def _lyco_ops(G):
    """The ``(lin, grp)`` of :func:`_chain_run` through lyco's ops: the bypass op per layer, the shared op for G."""
    from lyco.algorithms import lowrank_shared
    return (lambda p, t: lowrank.bypass_op(t, p[0], p[1], p[2], p[3], p[4], p[5]),
            lambda t: lowrank_shared.shared_op(t, G, torch.float64))


def _against_dense(run, z, got, x, layers, G):
    """``z`` and ``got`` (∂x, then each of ``layers``' ∂D and ∂U) against the same step with every layer through its
    merged weight in float64 autograd — fresh leaves; ``run(lin, grp)`` replays the step with ``lin(layer, t)`` and
    ``grp(t)`` (the group ``G``'s outputs)."""
    x.grad = None
    leaves = {id(t): t.detach().clone().requires_grad_() for p in layers + G for t in p[3:5]}

    def dense(p, t):
        d, u = leaves[id(p[3])], leaves[id(p[4])]
        return F.linear(t, p[1] + p[5] * u @ d, p[2])

    zr = run(dense, lambda t: [dense(p, t) for p in G])
    torch.testing.assert_close(z, zr, rtol=1e-10, atol=1e-10)
    ref = [x.grad] + [leaves[id(t)].grad for p in layers for t in p[3:5]]
    assert len(got) == len(ref)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_merged_weights_built_ahead_by_the_next_ops_backward(split, monkeypatch):
    """``LYCO_MERGE_AHEAD`` (:func:`lowrank._ahead_link`): forward A (bypass op) → G (a q/k/v group) → B (bypass
    op); the backward runs B, G, A. B's backward builds G's three merged weights on the up stream, G's builds A's;
    A's and G's backward merge nothing themselves, B (last in the forward: nothing before its backward) merges its
    own on the current stream. Every output and gradient against float64 math with the merged weights."""
    from lyco.algorithms import lowrank_shared
    monkeypatch.setattr(lowrank, "_ahead_on", lambda x: True)
    monkeypatch.setattr(lowrank_shared, "side_stream", lowrank.side_stream)
    monkeypatch.setattr(lowrank_shared, "up_stream", lowrank.up_stream)
    log = split
    merged = lowrank._merged  # the fixture's spy (logs "_merged@stream")
    monkeypatch.setattr(lowrank_shared, "_merged", merged)
    A, B, G, x, gz = _chain(5)
    run = _chain_run(A, B, G, x, gz)
    z = run(*_lyco_ops(G))
    got = [x.grad] + [t.grad for p in [A, B] + G for t in p[3:5]]
    assert log.count("_merged@up") == 4 and log.count("_merged@main") == 1, log
    ups, main = [i for i, e in enumerate(log) if e == "_merged@up"], log.index("_merged@main")
    # B's backward: G's three issued on the up stream before B's own on main; then G's backward: A's
    assert ups[2] < main < ups[3], log
    _against_dense(run, z, got, x, [A, B] + G, G)


def test_a_spent_holder_is_not_built():
    """A holder taken by its own backward (built or not) is spent: a build after that does nothing, and it keeps
    no tensor."""
    calls = []
    h = lowrank._Ahead(lambda a: calls.append(a) or torch.ones(2), (torch.zeros(3),))
    assert h.take() is None and h.args is None
    h.build()
    assert calls == [] and h.w is None
    h2 = lowrank._Ahead(lambda a: a + 1, (torch.zeros(2),))
    h2.build()
    h2.build()  # once
    w = h2.take()
    assert torch.equal(w, torch.ones(2)) and h2.take() is None and h2.args is None


def _late_streams(monkeypatch, log):
    """The late join on for the bypass op and the q/k/v group, the group on the recording streams, an empty store,
    no capture, and a stand-in ``torch.cuda.Event`` that logs ``event N on STREAM`` when recorded; returns the main
    stream."""
    from lyco.algorithms import lowrank_shared
    monkeypatch.setattr(lowrank, "_late_on", lambda t: True)
    monkeypatch.setattr(lowrank_shared, "_late_on", lambda t: True)
    monkeypatch.setattr(lowrank_shared, "side_stream", lowrank.side_stream)
    monkeypatch.setattr(lowrank_shared, "up_stream", lowrank.up_stream)
    monkeypatch.setattr(lowrank, "_LATE", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    count = [0]

    class _Event:
        def record(self, stream):
            count[0] += 1
            self.n, self.stream = count[0], stream
            log.append(f"event {self.n} on {stream.name}")

    monkeypatch.setattr(torch.cuda, "Event", _Event)
    return torch.cuda.current_stream()


@pytest.mark.parametrize("grouped", [False, True])
def test_late_join(split, monkeypatch, grouped):
    """``LYCO_LATE_JOIN`` (:func:`lowrank._late_join`): A → B (bypass ops, or A → a q/k/v group G → B) with the
    factor gradients added into ``.grad`` by the ops (the trainer's grad sink). B's backward leaves its up and side
    streams unjoined (events instead; it returns nothing they compute), and the next op's backward waits on those
    events first of all, before any product of its own; the group leaves both too (its ∂D's added into ``.grad`` on
    its side stream, ``lowrank._sink_add``; no split); the backward pass ends with the current stream waiting on the last op's events (autograd's
    final callback) and nothing left pending. Values against float64 math with the merged weights."""
    from lyco.algorithms import casts
    log = split
    main = _late_streams(monkeypatch, log)
    A, B, G, x, gz = _chain(7, grads=True)  # the sink adds into existing gradients
    run = _chain_run(A, B, G, x, gz, grouped)
    with casts.step_casts(grad_sink=True):
        z = run(*_lyco_ops(G))
    bwd = log[log.index("up waits main"):]
    assert lowrank._LATE.get(main.device, []) == []
    # B's backward ends with two events (side, up), not joins; the next op's backward waits on both before its own work
    ev = [e for e in bwd if e.startswith("event ")]
    assert ev[:2] == ["event 1 on side", "event 2 on up"], bwd
    first = bwd.index("event 2 on up") + 1
    assert bwd[first:first + 2] == ["main waits event 1 (side)", "main waits event 2 (up)"], bwd
    if grouped:  # G: both streams left (events 3, 4); A waits on both first of all
        nxt = bwd.index("main waits event 2 (up)") + 1
        g_end = bwd.index("event 4 on up")
        assert bwd[g_end - 1] == "event 3 on side", bwd
        assert "main waits side" not in bwd[nxt:g_end] and "main waits up" not in bwd[nxt:g_end], bwd
        assert bwd[g_end + 1:g_end + 3] == ["main waits event 3 (side)", "main waits event 4 (up)"], bwd
    # the pass ends: the current stream waits on A's events, nothing after
    last = [e for e in bwd if e.startswith("event ")][-2:]
    n1, n2 = (int(e.split()[1]) for e in last)
    assert bwd[-2:] == [f"main waits event {n1} (side)", f"main waits event {n2} (up)"], bwd
    assert "main waits side" not in bwd[:first] and "main waits up" not in bwd[:first], bwd
    layers = [A, B] + (G if grouped else [])
    _against_dense(run, z, [x.grad] + [t.grad for p in layers for t in p[3:5]], x, layers, G)


def test_late_wait_drops_work_of_another_capture_state(monkeypatch):
    """:func:`lowrank._late_wait`: the current stream waits on the events left in its own capture state; work left
    outside a capture and found inside one (or the reverse) is dropped without a wait; the tensors held for the side
    streams are let go either way."""
    import gc
    import weakref
    log = []

    class _S:
        name, device = "main", torch.device("cpu")

        def wait_event(self, ev):
            log.append(ev)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _S())
    monkeypatch.setattr(lowrank, "_LATE", {})
    kept = torch.zeros(3)
    ref = weakref.ref(kept)
    dev = torch.device("cpu")
    for capturing_now in (False, True):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda c=capturing_now: c)
        lowrank._LATE[dev] = [("outside", False, (kept,)), ("inside", True, None)]
        log.clear()
        lowrank._late_wait(dev)
        assert log == (["inside"] if capturing_now else ["outside"]) and lowrank._LATE[dev] == []
    del kept
    gc.collect()
    assert ref() is None


def test_late_join_in_captured_steps_by_default(monkeypatch):
    """``LYCO_LATE_JOIN`` unset: on in captured steps (``graph``) and only there, ``0`` off there too, ``1``
    everywhere; never on a CPU tensor."""
    import types

    from lyco.algorithms import graph_policy
    t = types.SimpleNamespace(is_cuda=True)
    monkeypatch.delenv("LYCO_LATE_JOIN", raising=False)
    assert not lowrank._late_on(t)
    with graph_policy.graph_step():
        assert lowrank._late_on(t) and not lowrank._late_on(torch.zeros(1))
        monkeypatch.setenv("LYCO_LATE_JOIN", "0")
        assert not lowrank._late_on(t)
    monkeypatch.setenv("LYCO_LATE_JOIN", "1")
    assert lowrank._late_on(t)


def _tensors(obj):
    """Every tensor in a nest of tuples and lists."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


@pytest.mark.parametrize("kind", ["linear", "wide-linear", "conv3x3"])
def test_late_join_keeps_what_the_side_streams_read(split, monkeypatch, kind):
    """Every tensor the side and up streams' products read (∂U's and ∂D's operands) is held by the late join's
    ``keep`` — or is a parameter's ``.grad``, which its parameter holds — on each layer kind that leaves its streams
    unjoined under the grad sink. The wide layer (:func:`lowrank._cat_pays`) is the case change 156 mended: its ∂D
    reads ∂h, a view of ``[∂x | ∂h/s]`` from one GEMM on the current stream, whose ∂x part autograd takes and frees
    there; unkept, the allocator could hand that memory on while the side stream still read it (session 37: the real
    trainer's captured SD1.5 b8 LoRA gave NaN losses and a NaN ∂D in the text encoder's wide ``mlp.fc1``, H100 runs
    271–272; the eager runs finite)."""
    from lyco.algorithms import casts
    monkeypatch.setattr(lowrank, "_late_on", lambda t: True)
    monkeypatch.setattr(lowrank, "_LATE", {})
    kept, read = [], []
    monkeypatch.setattr(lowrank, "_late_join", lambda side, keep: kept.append(keep))
    dh = []  # ∂D's ∂h argument where the caller had it (the wide layer's view)
    for name in ("_grad_up", "_grad_down"):
        def spy(*a, _fn=getattr(lowrank, name), _name=name, **k):
            read.extend(t for t in list(a) + list(k.values()) if torch.is_tensor(t))
            if _name == "_grad_down" and torch.is_tensor(a[8]):
                dh.append(a[8])
            return _fn(*a, **k)
        monkeypatch.setattr(lowrank, name, spy)
    g = torch.Generator().manual_seed(5)
    if kind == "conv3x3":
        mod, x, r = nn.Conv2d(6, 5, 3, padding=1), torch.randn(2, 6, 7, 7, generator=g, dtype=torch.float64), 4
    else:
        mod, r = (nn.Linear(12, 10), 4) if kind == "linear" else (nn.Linear(8, 40), 8)
        x = torch.randn(30, mod.in_features, generator=g, dtype=torch.float64)
    spec = LayerSpec.from_module(mod)
    w, b = mod.weight.detach().double(), mod.bias.detach().double()
    k = tuple(w.shape[2:])
    down = (0.3 * torch.randn((r, w.shape[1]) + k, generator=g, dtype=torch.float64)).requires_grad_()
    up = (0.3 * torch.randn((w.shape[0], r) + (1,) * len(k), generator=g, dtype=torch.float64)).requires_grad_()
    down.grad, up.grad = torch.zeros_like(down), torch.zeros_like(up)
    xx = x.clone().requires_grad_()
    with casts.step_casts(grad_sink=True):
        lowrank.bypass_op(xx, spec, w, b, down, up, 0.7).square().sum().backward()
    assert kept and read, (kept, read)
    if kind == "wide-linear":  # the shared GEMM's ∂h view reached ∂D: the case this test is about arose
        assert len(dh) == 1 and not dh[0].is_contiguous()
        assert lowrank._cat_pays(spec, r)
    held = {t.untyped_storage().data_ptr() for kp in kept for t in _tensors(kp)}
    held |= {down.grad.untyped_storage().data_ptr(), up.grad.untyped_storage().data_ptr()}
    missing = [tuple(t.shape) for t in read if t.untyped_storage().data_ptr() not in held]
    assert not missing, f"read on a side stream, not held until the late join's wait: {missing}"


@pytest.mark.parametrize("sink", [False, True])
def test_the_build_ahead_joined_with_the_up_stream(split, monkeypatch, sink):
    """A → G (a q/k/v group) → B, the merged weights built ahead on the up stream: B's backward builds the group's
    three there after its ∂U, G's builds A's. Factor gradients returned (no grad sink): each op joins the whole up
    stream — ∂U and the builds after it — before it returns, and records no event of its own there (session 38's
    ``LYCO_AHEAD_LATE`` joined ∂U alone and left the builds to their consumer; no gain measured, run 282 — taken out).
    Under the grad sink the late join leaves the whole up stream: its event comes after the builds. The pass ends
    with nothing pending; values against float64 math with the merged weights."""
    from lyco.algorithms import casts, lowrank_shared
    log = split
    monkeypatch.setattr(lowrank, "_ahead_on", lambda x: True)
    monkeypatch.setattr(lowrank_shared, "_merged", lowrank._merged)  # the fixture's spy
    main = _late_streams(monkeypatch, log)
    A, B, G, x, gz = _chain(9, grads=sink)
    run = _chain_run(A, B, G, x, gz)
    with casts.step_casts(grad_sink=sink):
        z = run(*_lyco_ops(G))
    bwd = log[log.index("up waits main"):]
    assert lowrank._LATE.get(main.device, []) == []
    ups = [i for i, e in enumerate(bwd) if e == "_merged@up"]
    assert len(ups) == 4, bwd  # B builds G's three, G builds A's
    if sink:  # B's first event on the up stream is the late join's, after the builds
        i_u = bwd.index("_grad_up@up")
        assert next(i for i, e in enumerate(bwd) if i > i_u and e.startswith("event ") and e.endswith("on up")) > ups[2]
    else:
        assert not any(e.startswith("event ") for e in bwd), bwd
        assert bwd.index("main waits up") > ups[2], bwd
    _against_dense(run, z, [x.grad] + [t.grad for p in [A, B] + G for t in p[3:5]], x, [A, B] + G, G)

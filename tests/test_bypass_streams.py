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
    def __init__(self, name, log):
        self.name, self.log, self.device = name, log, torch.device("cpu")

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


@pytest.fixture
def streams(monkeypatch):
    """A recording main and side stream; ``log`` lists waits, and every product below as ``name@stream``."""
    log = []
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


def test_linear_layer_backward_products_on_the_side_stream(streams):
    mod = nn.Linear(12, 10)
    _run(mod, torch.randn(40, 12, dtype=torch.float64))
    # forward: h and the frozen GEMM on the current stream (no cuBLAS workspace for the side stream there)
    assert not any(e.endswith("@side") for e in streams[:streams.index("side waits main")]), streams
    i = streams.index("side waits main")
    assert streams[i + 1:i + 3] == ["_grad_up@side", "_grad_down@side"], streams
    assert "_merged@main" in streams[i + 3:], streams  # ∂x through the merged weight, beside them
    _check_pairs(streams)


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
    monkeypatch.setattr(lowrank_triton, "add_lowrank", lambda w, u, d, s: calls.append(tuple(w.shape)) or real(w, u, d, s))
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
    assert calls == [(w.shape[0], w[0].numel())]
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
    monkeypatch.setattr(lowrank_triton, "add_lowrank", lambda w, u, d, s: calls.append(tuple(w.shape)) or real(w, u, d, s))
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


def test_deferred_join_when_every_factor_gradient_is_sunk(streams, monkeypatch):
    """``LYCO_SIDE_DEFER``: an op whose side-stream products all add into ``.grad`` (the sink) does not wait for them
    before it returns; the current stream waits for that region after the next op's backward issued its own (one
    region left running, ``DEFER_LAG``), and for the last one at the end of the backward pass — each wait after the
    region's products, the tensors they read held until then; the gradients equal float64 math. Without the sink
    (gradients returned to autograd) every op still joins before it returns."""
    from lyco.algorithms import casts

    log = streams
    monkeypatch.setenv("LYCO_SIDE_DEFER", "1")
    n_ev = [0]

    class _Event:
        def __init__(self):
            n_ev[0] += 1
            self.name = f"ev{n_ev[0]}"

        def record(self, stream):
            log.append(f"{self.name} on {stream.name}")

    main = torch.cuda.current_stream()
    monkeypatch.setattr(type(main), "wait_event", lambda self, ev: log.append(f"{self.name} waits {ev.name}"),
                        raising=False)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    g = torch.Generator().manual_seed(4)
    layers = [nn.Linear(12, 12).double() for _ in range(3)]
    factors = [((torch.randn(4, 12, generator=g, dtype=torch.float64) * 0.3).requires_grad_(),
                (torch.randn(12, 4, generator=g, dtype=torch.float64) * 0.3).requires_grad_()) for _ in layers]
    x = torch.randn(40, 12, generator=g, dtype=torch.float64)

    def step(sink):
        for d, u in factors:
            d.grad, u.grad = torch.zeros_like(d), torch.zeros_like(u)
        log.clear()
        with casts.step_casts(grad_sink=sink):
            h = x.clone().requires_grad_()
            y = h
            for mod, (d, u) in zip(layers, factors):
                y = lowrank.bypass_op(y, LayerSpec.from_module(mod), mod.weight.detach(), mod.bias.detach(), d, u, 0.7)
            y.square().sum().backward()
        assert not lowrank._PENDING  # everything waited for and released at the end of the pass
        return [t.grad.clone() for f in factors for t in f], list(log)

    got, log_sink = step(True)
    ref, log_plain = step(False)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # float64 reference from the definition
    yr = x
    leaves = [tuple(t.detach().clone().requires_grad_() for t in f) for f in factors]
    for mod, (d, u) in zip(layers, leaves):
        yr = F.linear(yr, mod.weight.detach() + 0.7 * u @ d, mod.bias.detach())
    yr.square().sum().backward()
    for a, b in zip(got, [t.grad for f in leaves for t in f]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    bwd = log_sink[log_sink.index("side waits main"):]
    assert "main waits side" not in bwd, bwd
    records = [e for e in bwd if e.endswith(" on side")]
    waits = [e for e in bwd if e.startswith("main waits ev")]
    assert len(records) == 3 and [w.split()[-1] for w in waits] == [r.split()[0] for r in records], bwd
    # region k is waited for only after region k+1 was issued (and the last at the pass's end)
    for k, r in enumerate(records[:-1]):
        assert bwd.index(records[k + 1]) < bwd.index(f"main waits {r.split()[0]}"), bwd
    assert bwd[-1] == f"main waits {records[-1].split()[0]}", bwd
    # every wait comes after the products of the region it waits for
    for r in records:
        assert bwd.index(r) > max(i for i, e in enumerate(bwd[:bwd.index(r)]) if e.endswith("@side")), bwd
    plain = log_plain[log_plain.index("side waits main"):]
    assert plain.count("main waits side") == 3 and not any(" on side" in e for e in plain), plain

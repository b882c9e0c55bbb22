"""LoKr's up ``U = kron(W1, A)`` built once per forward pass for all layers of a shape (``algorithms/factor_batch.py``):
every pass after the first is served from one batched build, and outputs and gradients stay those of the dense
float64 merged-weight model (written here with ``torch.kron``) — across optimizer steps, with a layer skipped in a
pass, under activation checkpointing, with the Triton kernels forced in (interpreter)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lyco
from lyco.algorithms import factor_batch, factor_triton
from lyco.algorithms import lokr as lokr_mod


class Stack(nn.Module):
    """Four 64→64 linear layers (one batch key) and a 64→48 one (another); ``skip`` leaves layer 2 out;
    ``ckpt`` runs layers 1–2 under non-reentrant activation checkpointing."""

    def __init__(self):
        super().__init__()
        self.l = nn.ModuleList([nn.Linear(64, 64) for _ in range(4)])
        self.o = nn.Linear(64, 48)

    def forward(self, x, skip=False, ckpt=False):
        for i, lin in enumerate(self.l):
            if skip and i == 2:
                continue
            if ckpt and i in (1, 2):
                x = checkpoint(lambda v, m=lin: torch.tanh(m(v)), x, use_reentrant=False)
            else:
                x = torch.tanh(lin(x))
        return self.o(x)


def _dense(model, net, x, skip=False):
    """The model on W + ΔW for every layer, ΔW = γ·kron(W1, A·B) from the file tensors (float64)."""
    lay = {name.removeprefix("model__"): layer for name, layer in net.layers.items()}

    def w(mod, key):
        t = lay[key].tensors()
        g = float(t["alpha"]) / t["lokr_w2_b"].shape[0]
        return mod.weight + g * torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"])

    for i, lin in enumerate(model.l):
        if skip and i == 2:
            continue
        x = torch.tanh(F.linear(x, w(lin, f"l__{i}"), lin.bias))
    return F.linear(x, w(model.o, "o"), model.o.bias)


def _setup():
    torch.manual_seed(0)
    model = Stack().double().requires_grad_(False)
    net = lyco.create(model, preset="full", algo="lokr", rank=2, alpha=1.5, factor=4, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    assert all("lokr_w2_b" in layer.tensors() and "lokr_w1" in layer.tensors() for layer in net.layers.values())
    return model, net


@pytest.fixture
def counts(monkeypatch):
    """Per-layer builds and batched builds in the calls that follow."""
    c = {"own": 0, "batch": 0}
    own, fwd = lokr_mod.LoKr._kron_up_own, factor_batch._StackBatch.forward

    def own_spy(self, t, dt):
        c["own"] += 1
        return own(self, t, dt)

    def fwd_spy(ctx, *a):
        c["batch"] += 1
        return fwd(ctx, *a)
    monkeypatch.setattr(lokr_mod.LoKr, "_kron_up_own", own_spy)
    monkeypatch.setattr(factor_batch._StackBatch, "forward", staticmethod(fwd_spy))
    factor_batch._BATCHES.clear()
    yield c
    factor_batch._BATCHES.clear()


def _step(model, net, x, **kw):
    params = list(net.trainable_parameters())
    y = model(x, **kw)
    grads = torch.autograd.grad(y.square().sum() + y.sum(), params, allow_unused=True)
    return y, dict(zip(map(id, params), grads))


def _reference(model, net, x, skip=False):
    params = list(net.trainable_parameters())
    y = _dense(model, net, x, skip)
    grads = torch.autograd.grad(y.square().sum() + y.sum(), params, allow_unused=True)
    return y, dict(zip(map(id, params), grads))


def _assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-11)
    assert got[1].keys() == want[1].keys()
    for k, g in got[1].items():
        if want[1][k] is None:
            assert g is None
        else:
            torch.testing.assert_close(g, want[1][k], rtol=1e-9, atol=1e-10)


def test_later_passes_are_batched_and_exact(counts):
    """Pass 1 builds per layer (5 builds); passes 2–3 one batch per shape (2), none per layer; every pass equals
    the dense model, also after the factors moved in place between passes (an optimizer step)."""
    model, net = _setup()
    x = torch.randn(3, 64, dtype=torch.float64)
    for step in range(3):
        counts.update(own=0, batch=0)
        got = _step(model, net, x)
        assert (counts["own"], counts["batch"]) == ((5, 0) if step == 0 else (0, 2))
        # every U handed out, none held by the batches (a held U would keep the pass's autograd graph alive)
        assert all(o is None for b in factor_batch._BATCHES.values() for o in b.outs)
        _assert_same(got, _reference(model, net, x))
        with torch.no_grad():  # the optimizer's in-place step: the next pass must not serve the old U's
            for p in net.trainable_parameters():
                p.mul_(1.1).add_(0.01)


def test_layer_left_out_gets_no_gradient(counts):
    """A member of the batch that this pass does not call gets None for its factors (as without the batch: an
    optimizer then skips it), the others their exact gradients."""
    model, net = _setup()
    x = torch.randn(3, 64, dtype=torch.float64)
    _step(model, net, x)
    counts.update(own=0, batch=0)
    got = _step(model, net, x, skip=True)
    assert counts["batch"] == 2 and counts["own"] == 0
    want = _reference(model, net, x, skip=True)
    t2 = net.layers[next(k for k in net.layers if k.endswith("l__2"))].tensors()
    assert got[1][id(t2["lokr_w1"])] is None and got[1][id(t2["lokr_w2_a"])] is None
    _assert_same(got, want)


def test_checkpointed_layers_build_their_own(counts):
    """Under activation checkpointing (saved-tensor hooks forward, recomputation in backward) a layer builds its
    own U in both runs of its region — the recomputation saves what the forward saved — and the results equal
    the dense model's."""
    model, net = _setup()
    x = torch.randn(3, 64, dtype=torch.float64)
    _step(model, net, x)
    counts.update(own=0, batch=0)
    got = _step(model, net, x, ckpt=True)
    assert counts["own"] == 4  # layers 1 and 2, forward and recomputed
    _assert_same(got, _reference(model, net, x))


def test_no_batch_without_gradients(counts):
    model, net = _setup()
    x = torch.randn(3, 64, dtype=torch.float64)
    for _ in range(2):
        with torch.no_grad():
            y = model(x)
    assert counts["batch"] == 0 and counts["own"] == 10
    with torch.no_grad():
        torch.testing.assert_close(y, _dense(model, net, x), rtol=1e-10, atol=1e-11)


def test_batched_kernels_in_a_layer(counts, monkeypatch, triton_interpreter):
    """The Triton kernels forced in (the interpreter): the batched launches serve passes 2–3 and the model in
    float32 stays within fp32 rounding of the dense float64 model."""
    monkeypatch.setattr(factor_triton, "usable", lambda t, inner: True)
    launched = {"fwd": 0, "bwd": 0}
    f, b = factor_triton.kron_forward_batched, factor_triton.kron_backward_batched
    monkeypatch.setattr(factor_triton, "kron_forward_batched",
                        lambda *a: launched.__setitem__("fwd", launched["fwd"] + 1) or f(*a))
    monkeypatch.setattr(factor_triton, "kron_backward_batched",
                        lambda *a: launched.__setitem__("bwd", launched["bwd"] + 1) or b(*a))
    model, net = _setup()
    model.float()
    for layer in net.layers.values():
        for v in layer.tensors().values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v.data = v.data.float()
    x = torch.randn(3, 64)
    for _ in range(2):
        got = _step(model, net, x)
    assert launched == {"fwd": 2, "bwd": 2}
    model.double()
    for layer in net.layers.values():
        for v in layer.tensors().values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v.data = v.data.double()
    want = _reference(model, net, x.double())
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)
    for k, g in got[1].items():
        torch.testing.assert_close(g.double(), want[1][k], rtol=1e-4, atol=1e-4)


def test_member_changed_in_place_after_the_batch_is_not_served_stale(counts):
    """The batch is built at a pass's first call; a member whose factors then move in place (its version counter)
    gets a fresh U when it is called, not the one built before the change."""
    model, net = _setup()
    x = torch.randn(3, 64, dtype=torch.float64)
    _step(model, net, x)
    h = model.l[0](x)  # a new pass: the batch over every 64→64 layer is built here
    assert counts["batch"] == 1
    t3 = net.layers["model__l__3"].tensors()
    with torch.no_grad():
        t3["lokr_w1"].mul_(-2.0)
    y = model.l[3](h)
    g = float(t3["alpha"]) / t3["lokr_w2_b"].shape[0]
    w = model.l[3].weight + g * torch.kron(t3["lokr_w1"], t3["lokr_w2_a"] @ t3["lokr_w2_b"])
    torch.testing.assert_close(y, F.linear(h, w, model.l[3].bias), rtol=1e-10, atol=1e-11)


def test_layers_checked_one_by_one(counts):
    """Each layer alone, forward then backward, as a per-layer check does: the backward of the first layer runs
    the batch's node (its saved tensors freed), so the next layer must get a new batch, not the spent one — and
    every layer's gradients equal the dense layer's."""
    model, net = _setup()
    x = torch.randn(3, 64, dtype=torch.float64)
    _step(model, net, x)
    for i, lin in enumerate(model.l):
        t = net.layers[f"model__l__{i}"].tensors()
        leaves = [t["lokr_w1"], t["lokr_w2_a"], t["lokr_w2_b"]]
        got = torch.autograd.grad(lin(x).square().sum(), leaves)
        g = float(t["alpha"]) / t["lokr_w2_b"].shape[0]
        w = lin.weight + g * torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"])
        want = torch.autograd.grad(F.linear(x, w, lin.bias).square().sum(), leaves)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert counts["batch"] >= 4


def test_member_with_freed_storage_left_out(counts):
    """A sharding wrapper (FSDP) frees a parameter's storage between its calls: a member whose storage is gone is
    left out of the next batch (reading it would read freed memory), and the layers called give exact results."""
    model, net = _setup()
    x = torch.randn(3, 64, dtype=torch.float64)
    _step(model, net, x)
    t2 = net.layers["model__l__2"].tensors()
    t2["lokr_w1"].untyped_storage().resize_(0)
    assert not factor_batch._backed(t2["lokr_w1"]) and factor_batch._backed(t2["lokr_w2_a"])
    counts.update(own=0, batch=0)
    got = _step(model, net, x, skip=True)
    assert counts["batch"] == 2 and counts["own"] == 0
    _assert_same(got, _reference(model, net, x, skip=True))


class HadaNet(nn.Module):
    """Three 64→64 linear layers (one batch key) and a 3×3 conv 16→32 (another), all on LoHa's Khatri–Rao
    form."""

    def __init__(self):
        super().__init__()
        self.l = nn.ModuleList([nn.Linear(64, 64) for _ in range(3)])
        self.c = nn.Conv2d(16, 32, 3, padding=1)

    def forward(self, x, img):
        for lin in self.l:
            x = torch.tanh(lin(x))
        return x.square().sum() + torch.tanh(self.c(img)).square().sum()


def _hada_setup(dtype):
    """HadaNet in ``dtype`` with a LoHa on every layer, its factors moved off their init; (model, net, params)."""
    torch.manual_seed(0)
    model = HadaNet().to(dtype).requires_grad_(False)
    net = lyco.create(model, preset="full", algo="loha", rank=3, alpha=2.0, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model, net, list(net.trainable_parameters())


def _hada_dense(model, net, x, img):
    """The model on W + γ·(a1·b1)⊙(a2·b2) per layer, float64, from the file tensors."""
    lay = {name.removeprefix("model__"): layer for name, layer in net.layers.items()}

    def w(mod, key):
        t = lay[key].tensors()
        g = float(t["alpha"]) / t["hada_w1_b"].shape[0]
        dw = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return mod.weight + g * dw.reshape(mod.weight.shape)

    for i, lin in enumerate(model.l):
        x = torch.tanh(F.linear(x, w(lin, f"l__{i}"), lin.bias))
    return x.square().sum() + torch.tanh(F.conv2d(img, w(model.c, "c"), model.c.bias, padding=1)).square().sum()


def test_loha_khatri_rao_batched_and_exact(monkeypatch):
    """LoHa's pair (Ka, Kb) from one batch per shape after the first pass: the model's output and every factor's
    gradient equal the dense float64 model in every pass, across in-place updates."""
    factor_batch._BATCHES.clear()
    own = []
    from lyco.algorithms import loha as loha_mod
    orig = loha_mod.khatri_rao_pair
    monkeypatch.setattr(loha_mod, "khatri_rao_pair", lambda *a: own.append(1) or orig(*a))
    batches = []
    fwd = factor_batch._StackBatch.forward

    def fwd_spy(ctx, token, kind, *a):
        batches.append(kind.name)
        return fwd(ctx, token, kind, *a)
    monkeypatch.setattr(factor_batch._StackBatch, "forward", staticmethod(fwd_spy))
    model, net, params = _hada_setup(torch.float64)
    x, img = torch.randn(3, 64, dtype=torch.float64), torch.randn(2, 16, 5, 5, dtype=torch.float64)
    for step in range(3):
        own.clear()
        batches.clear()
        y = model(x, img)
        got = torch.autograd.grad(y, params)
        assert (len(own), len(batches)) == ((4, 0) if step == 0 else (0, 2))
        assert set(batches) <= {"khatri-rao"}
        ref = _hada_dense(model, net, x, img)
        want = torch.autograd.grad(ref, params)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        with torch.no_grad():
            for p in params:
                p.mul_(0.9).add_(0.01)
    factor_batch._BATCHES.clear()


def test_loha_batched_kernels_in_a_layer(monkeypatch, triton_interpreter):
    """LoHa with the Triton kernels forced in (the interpreter): the batched launches serve the second pass and
    the fp32 model stays within fp32 rounding of the dense float64 model."""
    factor_batch._BATCHES.clear()
    monkeypatch.setattr(factor_triton, "usable", lambda t, inner: True)
    launched = []
    f, b = factor_triton.khatri_rao_batched, factor_triton.khatri_rao_backward_batched
    monkeypatch.setattr(factor_triton, "khatri_rao_batched", lambda *a: launched.append("fwd") or f(*a))
    monkeypatch.setattr(factor_triton, "khatri_rao_backward_batched", lambda *a: launched.append("bwd") or b(*a))
    model, net, params = _hada_setup(torch.float32)
    x, img = torch.randn(3, 64), torch.randn(2, 16, 5, 5)
    for _ in range(2):
        got = torch.autograd.grad(model(x, img), params)
    assert sorted(launched) == ["bwd", "bwd", "fwd", "fwd"]  # the second pass: two shapes, one launch each way
    model.double()
    for p in params:
        p.data = p.data.double()
    want = torch.autograd.grad(_hada_dense(model, net, x.double(), img.double()), params)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-4, atol=1e-4)
    factor_batch._BATCHES.clear()


def _sink_pass(model, params, run, start=0.25):
    """One forward and ``.backward()`` under the trainer's grad sink, every parameter's ``.grad`` set to ``start``
    first: each parameter's gradient as ``.grad − start``."""
    from lyco.algorithms import casts
    for p in params:
        p.grad = torch.full_like(p, start)
    with casts.step_casts(grad_sink=True):
        run().backward()
    return [p.grad - start for p in params]


@pytest.mark.parametrize("tail", ["1", "0"])
@pytest.mark.parametrize("skip", [False, True])
def test_tail_adds_the_batch_gradients_into_grad(counts, monkeypatch, tail, skip):
    """Under the grad sink with ``LYCO_FACTOR_TAIL=1`` each batch's backward adds its members' gradients into their
    ``.grad`` itself (on the CPU in place; on CUDA on the tail stream) — a member left out of the pass keeps its
    ``.grad`` — and every gradient equals the dense float64 model's, as with the tail off."""
    monkeypatch.setenv("LYCO_FACTOR_TAIL", tail)
    tails, real = [], factor_batch._tail
    monkeypatch.setattr(factor_batch, "_tail", lambda *a: tails.append(1) or real(*a))
    model, net = _setup()
    params = list(net.trainable_parameters())
    x = torch.randn(3, 64, dtype=torch.float64)
    for step in range(3):
        tails.clear()
        got = _sink_pass(model, params, lambda: (lambda y: y.square().sum() + y.sum())(model(x, skip=skip)))
        assert len(tails) == (0 if step == 0 or tail == "0" else 2)
        want = _reference(model, net, x, skip)[1]
        for p, g in zip(params, got):
            w = want[id(p)]
            torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, rtol=1e-9, atol=1e-10)
        with torch.no_grad():
            for p in params:
                p.mul_(1.1).add_(0.01)


@pytest.mark.parametrize("why", ["hook", "no-grad"])
def test_tail_declined_where_a_factor_cannot_take_it(counts, monkeypatch, why):
    """A factor with a tensor hook (its hook must see the gradient) or without a ``.grad`` to add into: that
    factor's batch returns the gradients as before (the other shape's takes the tail) — every gradient still the dense
    model's, the hook called."""
    monkeypatch.setenv("LYCO_FACTOR_TAIL", "1")
    tails, real = [], factor_batch._tail
    monkeypatch.setattr(factor_batch, "_tail", lambda *a: tails.append(1) or real(*a))
    model, net = _setup()
    params = list(net.trainable_parameters())
    seen = []
    if why == "hook":
        params[0].register_hook(lambda g: seen.append(1))
    x = torch.randn(3, 64, dtype=torch.float64)
    loss = lambda: (lambda y: y.square().sum() + y.sum())(model(x))  # noqa: E731
    _sink_pass(model, params, loss)  # the first pass builds per layer: no batch yet
    if why == "hook":
        got = _sink_pass(model, params, loss)
    else:
        from lyco.algorithms import casts
        for p in params:
            p.grad = torch.full_like(p, 0.25)
        params[0].grad = None
        with casts.step_casts(grad_sink=True):
            loss().backward()
        got = [p.grad - (0.0 if i == 0 else 0.25) for i, p in enumerate(params)]
    want = _reference(model, net, x)[1]
    for p, g in zip(params, got):
        torch.testing.assert_close(g, want[id(p)], rtol=1e-9, atol=1e-10)
    assert len(tails) == 1 and bool(seen) == (why == "hook")


def test_loha_tail_adds_into_grad(monkeypatch):
    """LoHa's Khatri–Rao batches under the grad sink with the tail: every gradient the dense float64 model's."""
    monkeypatch.setenv("LYCO_FACTOR_TAIL", "1")
    factor_batch._BATCHES.clear()
    tails, real = [], factor_batch._tail
    monkeypatch.setattr(factor_batch, "_tail", lambda *a: tails.append(1) or real(*a))
    model, net, params = _hada_setup(torch.float64)
    x, img = torch.randn(3, 64, dtype=torch.float64), torch.randn(2, 16, 5, 5, dtype=torch.float64)
    for _ in range(2):
        got = _sink_pass(model, params, lambda: model(x, img))
    want = torch.autograd.grad(_hada_dense(model, net, x, img), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert len(tails) == 2
    factor_batch._BATCHES.clear()

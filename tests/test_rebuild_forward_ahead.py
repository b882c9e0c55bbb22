"""The rebuilt op's W′ built a layer ahead — the forward's (``rebuild._forward_ahead``, ``LYCO_REBUILD_FORWARD_AHEAD``;
LoKr's build offers it) and ∂x's in the backward (``rebuild._backward_ahead``, ``LYCO_REBUILD_BACKWARD_AHEAD``): over
several SGD steps the outputs, ∂x and every factor gradient equal the same steps without them and a float64 forward
through ``torch.kron``; the builds issued ahead are the ones the ops take. The CPU has no up
stream: a stand-in where the policy asks for one, its forks and joins no-ops, the builds run in place in the order
the GPU would issue them — so a build issued too early (before the optimizer's update) would read stale factors here
as there."""

import pytest
import torch
import torch.nn as nn

import lyco
from lyco.algorithms import lokr as lokr_mod
from lyco.algorithms import lowrank, rebuild

_FORK, _JOIN = lowrank._fork, lowrank._join


class _Net(nn.Module):
    """Three linear layers in a row (factor 4, both factors full) and a conv: the forward's order."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16)
        self.c = nn.Linear(16, 16)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, tok, img):
        t = self.c(torch.tanh(self.b(torch.tanh(self.a(tok)))))
        return t.sum() + self.conv(img).square().mean()


def _switch(monkeypatch, ahead: bool, back: bool = False, side: str = ""):
    """The switches, a stand-in up stream and — ``side`` "side" or "early" — a stand-in side stream for the rebuilt
    op's backward (``LYCO_REBUILD_STREAMS``), with the early fork for "early"; a fresh order."""
    monkeypatch.setenv("LYCO_REBUILD_FORWARD_AHEAD", "1" if ahead else "0")
    monkeypatch.setenv("LYCO_REBUILD_BACKWARD_AHEAD", "1" if back else "0")
    monkeypatch.setenv("LYCO_REBUILD_STREAMS", "1" if side else "0")
    monkeypatch.setenv("LYCO_REBUILD_EARLY_FORK", "1" if side == "early" else "0")
    fake = object()
    monkeypatch.setattr(lowrank, "up_stream", lambda t: fake)
    monkeypatch.setattr(lowrank, "side_stream", lambda t: fake)
    monkeypatch.setattr(lowrank, "_LAST", {})
    monkeypatch.setattr(lowrank, "_fork", lambda side, sms=True: _FORK(None if side is fake else side, sms))
    monkeypatch.setattr(lowrank, "_join", lambda side: _JOIN(None if side is fake else side))
    monkeypatch.setattr(lowrank, "_FWD_STATE", {})
    monkeypatch.setattr(lowrank, "_FWD_NODES", {})


def _train(ahead: bool, monkeypatch, steps=3, back: bool = False, side: str = ""):
    """Per SGD step (lr 1e-3): the loss, ∂tok, ∂img and every factor's gradient; and the net."""
    _switch(monkeypatch, ahead, back, side)
    torch.manual_seed(0)
    model = _Net()
    net = lyco.create(model, preset="full", algo="lokr", factor=4, full_matrix=True, alpha=1, seed=0)
    for layer in net.layers.values():
        layer.mode = "rebuild"
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    tok = torch.randn(2, 6, 16, generator=g)
    img = torch.randn(2, 4, 5, 5, generator=g)
    out = []
    for _ in range(steps):
        t, i = tok.clone().requires_grad_(True), img.clone().requires_grad_(True)
        loss = model(t, i)
        loss.backward()
        out.append((loss.detach(), t.grad, i.grad, [p.grad.clone() for p in net.trainable_parameters()]))
        with torch.no_grad():
            for p in net.trainable_parameters():
                p.sub_(1e-3 * p.grad)
                p.grad = None
    return out, model, net


@pytest.mark.parametrize("fwd,back,side", [(True, False, ""), (False, True, ""), (True, True, ""),
                                           (True, True, "side"), (False, True, "early")])
def test_steps_match_without_it_and_float64(fwd, back, side, monkeypatch):
    calls, taken = [], []
    real, real_take = lokr_mod.LoKr._ahead_aux, lowrank._ahead_take

    def spy(self, *a):
        calls.append(a[0])
        return real(self, *a)

    def spy_take(ahead):
        got = real_take(ahead)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(lokr_mod.LoKr, "_ahead_aux", spy)
    monkeypatch.setattr(lowrank, "_ahead_take", spy_take)
    rebuilds, real_rebuild = [], lokr_mod._KronBuild.recompute
    monkeypatch.setattr(lokr_mod._KronBuild, "recompute", lambda self, *a: rebuilds.append(1) or real_rebuild(self, *a))
    sides, real_side = [], rebuild._side
    monkeypatch.setattr(rebuild, "_side", lambda gy: (lambda v: sides.append(v is not None) or v)(real_side(gy)))
    got, model, net = _train(fwd, monkeypatch, back=back, side=side)
    assert sides == [bool(side)] * 4 * 3, sides  # the backward's side-stream form where asked, else the plain one
    assert len(rebuilds) == 4 * 3, len(rebuilds)  # one backward W′ an op, built ahead or not: none built twice
    n_ahead, n_taken = len(calls), list(taken)
    want, _, _ = _train(False, monkeypatch)
    assert len(calls) == n_ahead and taken == n_taken  # off: never asked
    # 4 rebuilt ops a step: the first forward builds each op's own W′ through it; after that each op's W′ comes from
    # the op before it (the first op's from itself) — every call one W′ an op takes, none thrown away
    assert n_ahead == (4 * 3 if fwd else 0), n_ahead
    # backward: the last op of the forward rebuilds its own; each other op takes the one the op after it built
    assert n_taken == ([False, True, True, True] * 3 if back else []), n_taken
    for i, (a, b) in enumerate(zip(got, want)):
        for x, y in zip(a[:3], b[:3]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=f"step {i}")
        for x, y in zip(a[3], b[3]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=f"step {i}")
    # the last step's loss in float64 through torch.kron, the factors as they were before its update
    params = {n: p.detach().double() + 1e-3 * gr.double()
              for (n, p), gr in zip(net.named_parameters(), got[-1][3])}

    def delta(name, shape):
        w1 = params[f"layers.{name}.params.lokr_w1"]
        w2 = params[f"layers.{name}.params.lokr_w2"]
        return torch.kron(w1, w2.reshape(w2.shape[0], -1)).reshape(shape)

    g = torch.Generator().manual_seed(5)
    for p in net.trainable_parameters():
        torch.randn(p.shape, generator=g)
    tok = torch.randn(2, 6, 16, generator=g).double()
    img = torch.randn(2, 4, 5, 5, generator=g).double()

    def lin(m, name, x):
        return x @ (m.weight.double() + delta(name, m.weight.shape)).t() + m.bias.double()

    t = lin(model.c, "model__c", torch.tanh(lin(model.b, "model__b", torch.tanh(lin(model.a, "model__a", tok)))))
    w = model.conv.weight.double() + delta("model__conv", model.conv.weight.shape)
    ref = t.sum() + torch.nn.functional.conv2d(img, w, model.conv.bias.double(), padding=1).square().mean()
    torch.testing.assert_close(got[-1][0].double(), ref, rtol=1e-5, atol=1e-6)


def test_ahead_build_holds_nothing_alive(monkeypatch):
    """A dropped adapter's tensors are not kept alive by the order's nodes (the builds hold them weakly)."""
    import gc
    import weakref
    _switch(monkeypatch, True)
    model = _Net()
    net = lyco.create(model, preset="full", algo="lokr", factor=4, full_matrix=True, seed=0)
    for layer in net.layers.values():
        layer.mode = "rebuild"
    tok, img = torch.randn(2, 6, 16), torch.randn(2, 4, 5, 5)
    model(tok, img).backward()
    refs = [weakref.ref(p) for p in net.trainable_parameters()]
    assert lowrank._FWD_NODES
    del net, model, layer
    gc.collect()
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("raw,want", [("1", True), ("0", False), (None, False)])
def test_switch(raw, want, monkeypatch):
    """``1`` everywhere there is an up stream, ``0`` and unset (the default: not measured) nowhere; the CPU has none."""
    from lyco.algorithms import rebuild
    for var in ("LYCO_REBUILD_FORWARD_AHEAD", "LYCO_REBUILD_BACKWARD_AHEAD"):
        if raw is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, raw)
    x = torch.zeros(1)
    assert (rebuild._forward_ahead(x), rebuild._backward_ahead(x)) == (False, False)
    monkeypatch.setattr(lowrank, "up_stream", lambda t: object())
    assert (rebuild._forward_ahead(x), rebuild._backward_ahead(x)) == (want, want)

"""The batched Cayley inverse of the OFT/BOFT rebuilt op (``oft.batched_inverse`` on
``factor_batch.PassBatch``): every unconstrained
layer's ``(I − Q)⁻¹`` in one call per forward pass. What could go wrong is staleness — a layer using an
inverse computed from blocks that have changed since (an optimizer step, a layer that a forward pass
skipped, a new layer). Each test trains or runs the same model twice from the same state: on the rebuilt
op (batched) and on the delta path (``mode = "bypass"``: per-layer rotations, an independent
computation), in float64, and compares every output and gradient."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn

import lyco
from lyco.algorithms import factor_batch, oft


class Branches(nn.Module):
    """Two branches of OFT-adapted layers; ``which`` picks the branches a forward pass runs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(), nn.Linear(4, 8))
        self.which = "ab"

    def forward(self, x, img):
        out = x.new_zeros(())
        if "a" in self.which:
            out = out + self.a(x).square().sum()
        if "b" in self.which:
            out = out + self.b(img).square().sum()
        return out


@pytest.fixture
def computes(monkeypatch):
    """A list that gets one entry per batched recomputation (``oft._inverse_compute``)."""
    calls = []
    orig = oft._inverse_compute
    monkeypatch.setattr(oft, "_inverse_compute", lambda *args: calls.append(1) or orig(*args))
    return calls


def _pair(algo, seed=0):
    torch.manual_seed(seed)
    base = Branches().double()
    models = []
    for mode in ("rebuild", "bypass"):
        m = copy.deepcopy(base)
        net = lyco.create(m, preset="full", algo=algo, rank=2, seed=seed, mode=mode)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in net.trainable_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        models.append((m, net))
    return models


def _step(model, net, x, img, lr=0.05):
    """One forward/backward; the gradients returned, then an in-place SGD update of the blocks."""
    loss = model(x, img)
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in net.trainable_parameters()]
    with torch.no_grad():
        for p in net.trainable_parameters():
            if p.grad is not None:  # (a skipped branch has none)
                p.sub_(lr * p.grad)
            p.grad = None
    return loss.detach(), grads


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_training_with_skipped_layers_matches_the_per_layer_path(algo):
    (m1, n1), (m2, n2) = _pair(algo)
    assert all(l.prefers_rebuild for l in n1.layers.values())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    img = torch.randn(2, 8, 4, 4, generator=g, dtype=torch.float64)
    # all layers; branch a only (b's entries stay unused); both again — b's blocks did not change, a's did;
    # b only (a's entries stay unused while b's change); both
    for which in ("ab", "a", "ab", "b", "ab", "ab"):
        m1.which = m2.which = which
        l1, g1 = _step(m1, n1, x, img)
        l2, g2 = _step(m2, n2, x, img)
        torch.testing.assert_close(l1, l2, rtol=1e-10, atol=1e-12)
        assert [a is None for a in g1] == [b is None for b in g2]
        assert sum(a is not None for a in g1) > 0
        for a, b in zip(g1, g2):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_load_state_dict_and_a_new_network_are_picked_up():
    (m1, n1), (m2, n2) = _pair("diag-oft")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    img = torch.randn(2, 8, 4, 4, generator=g, dtype=torch.float64)
    _step(m1, n1, x, img)
    _step(m2, n2, x, img)
    # new values written in place without a forward in between (load_state_dict copies into the params)
    sd = {k: v + 0.1 for k, v in n2.state_dict().items() if "oft_blocks" in k}
    n1.load_state_dict(sd, strict=False)
    n2.load_state_dict(sd, strict=False)
    # a second network on another model joins the same batch
    (m3, n3), (m4, n4) = _pair("diag-oft", seed=3)
    for (ma, na), (mb, nb) in (((m1, n1), (m2, n2)), ((m3, n3), (m4, n4)), ((m1, n1), (m2, n2))):
        la, ga = _step(ma, na, x, img)
        lb, gb = _step(mb, nb, x, img)
        torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-12)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_one_batched_inverse_per_forward_and_dead_layers_dropped(computes):
    calls = computes
    (m1, n1), _ = _pair("diag-oft", seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    img = torch.randn(2, 8, 4, 4, generator=g, dtype=torch.float64)
    _step(m1, n1, x, img)                          # first pass: each layer computes its own and joins
    assert calls == []
    for _ in range(3):
        _step(m1, n1, x, img)
    assert len(calls) == 3                         # then one batched call per forward pass
    calls.clear()
    for _ in range(2):                             # also when nothing changed in between: a CUDA graph
        m1(x, img).backward()                      # captures one forward and replays it with new blocks,
    assert len(calls) == 2                         # so the recomputation must be part of every forward
    batch = next(b for b in oft._INVERSE_BATCHES.values()
                 if {id(p) for p in n1.trainable_parameters()} <= {id(r[0]()) for r in b.refs})
    # another network trains while the first one stays alive but idle: from its second pass on, the batch
    # holds exactly its layers (a CUDA graph captured now must not read the idle network's blocks, which
    # may be freed while the graph lives)
    (m6, n6), _ = _pair("diag-oft", seed=10)
    for _ in range(2):
        _step(m6, n6, x, img)
    assert sorted(id(r[0]()) for r in batch.refs) == sorted(id(p) for p in n6.trainable_parameters())
    ref1 = weakref.ref(next(iter(n1.trainable_parameters())))
    del m1, n1, m6, n6, _
    gc.collect()
    assert ref1() is None
    (m5, n5), _ = _pair("diag-oft", seed=9)
    for _ in range(2):
        _step(m5, n5, x, img)
    # dead layers dropped
    assert sorted(id(r[0]()) for r in batch.refs) == sorted(id(p) for p in n5.trainable_parameters())


def test_a_capture_recomputes_even_when_every_entry_is_fresh(computes, monkeypatch):
    """A pass over branch a computes branch b's inverses too (b was in the previous pass); a following
    pass over b alone finds its entries unused and its blocks unchanged: served as they are in eager mode
    (right), but the first call inside a CUDA graph capture must recompute — a replay would otherwise read
    the pre-capture batch forever. (The capture is simulated: ``factor_batch._capturing`` patched.)"""
    calls = computes
    (m1, n1), _ = _pair("diag-oft", seed=13)
    x = torch.randn(3, 8, dtype=torch.float64)
    img = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    for which in ("ab", "ab", "a"):
        m1.which = which
        m1(x, img).backward()
    m1.which = "b"
    calls.clear()
    m1(x, img).backward()
    assert calls == []                       # eager: b's fresh entries served
    for which in ("ab", "ab", "a"):
        m1.which = which
        m1(x, img).backward()
    m1.which = "b"
    calls.clear()
    monkeypatch.setattr(factor_batch, "_capturing", lambda t: True)
    m1(x, img).backward()
    assert len(calls) == 1                   # capture: recomputed at its first call, then served


@pytest.mark.parametrize("algo", ["diag-oft", "boft"])
def test_gradient_checkpointing_from_the_first_pass(algo):
    """Non-reentrant checkpointing re-runs the forward inside the backward, where the layers take the
    batched inverse although the original pass computed their own: the re-run must save what the pass
    saved (torch checks the count), and the gradients are those of the plain run."""
    from torch.utils.checkpoint import checkpoint
    (m1, n1), (m2, n2) = _pair(algo, seed=14)
    for layer in n2.layers.values():
        layer.mode = "rebuild"  # both on the rebuilt op: only the checkpointing differs
    x = torch.randn(3, 8, dtype=torch.float64)
    img = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    for _ in range(2):
        checkpoint(m1, x, img, use_reentrant=False).backward()
        m2(x, img).backward()
        for a, b in zip(n1.trainable_parameters(), n2.trainable_parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
            a.grad = b.grad = None


def test_a_capture_whose_first_layer_is_new_still_recomputes(computes, monkeypatch):
    """A layer never called before opens the capture (it computes its own inverse): the next layers must
    not be served the batch computed before the capture either."""
    calls = computes
    (m1, n1), _ = _pair("diag-oft", seed=15)
    x = torch.randn(3, 8, dtype=torch.float64)
    img = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    for which in ("ab", "ab", "a"):         # a's pass computes b's entries too: unused, up to date
        m1.which = which
        m1(x, img).backward()
    # forget a's layers so that a's layers are new again, as layers added just before a capture
    batch = next(b for b in oft._INVERSE_BATCHES.values()
                 if {id(p) for p in n1.trainable_parameters()} <= {id(r[0]()) for r in b.refs})
    a_ids = {id(p) for name, p in n1.named_parameters() if "__a__" in name}
    batch.seen = {k: v for k, v in batch.seen.items() if k not in a_ids}
    m1.which = "ab"
    calls.clear()
    monkeypatch.setattr(factor_batch, "_capturing", lambda t: True)
    m1(x, img).backward()
    assert len(calls) == 1                   # b's first call recomputed although its entry was fresh


def test_member_with_freed_storage_left_out(computes):
    """A sharding wrapper (FSDP) frees a parameter's storage between its calls: branch b's blocks freed, a pass
    over branch a alone recomputes the batch without them (reading them would read freed memory) and matches
    the per-layer path."""
    (m1, n1), (m2, n2) = _pair("diag-oft", seed=16)
    x = torch.randn(3, 8, dtype=torch.float64)
    img = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    for _ in range(2):
        _step(m1, n1, x, img)
        _step(m2, n2, x, img)
    for name, p in n1.named_parameters():
        if "__b__" in name:
            p.untyped_storage().resize_(0)
    m1.which = m2.which = "a"
    computes.clear()
    l1, g1 = _step(m1, n1, x, img)
    l2, g2 = _step(m2, n2, x, img)
    assert len(computes) == 1
    torch.testing.assert_close(l1, l2, rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, g2):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

"""A linear layer's op forward through its merged weight built ahead (``lowrank._fwd_weights``,
``LYCO_FORWARD_MERGED``): the order bookkeeping (which op's weights are built ahead by which, what happens when the
order changes or a backward begins), and the bypass op and the q/k/v group taking it over several training steps —
outputs and every gradient against the same steps without it and against dense float64 math. On the CPU there is no
up stream: the builds run in place, in the order the GPU would issue them (so a build issued too early — before the
optimizer's update — reads stale factors here as there)."""

import pytest
import torch
import torch.nn as nn

import lyco
from lyco.algorithms import lowrank, lowrank_shared

#: the real forks and joins, which :func:`_switch`'s stand-ins call (taken before any test patches them)
_FORK, _JOIN = lowrank._fork, lowrank._join


@pytest.fixture
def fresh_order(monkeypatch):
    monkeypatch.setattr(lowrank, "_FWD_STATE", {})
    monkeypatch.setattr(lowrank, "_FWD_NODES", {})


def test_ahead_build_is_the_registered_call_of_the_next_op(fresh_order):
    """The build issued ahead is the next op's call from its last forward — its tensors read when it runs — and the op
    takes it; an op that does not come leaves its build dropped, and the op after builds its own."""
    x = torch.zeros(1)
    keys = [torch.zeros(1) for _ in range(3)]
    vals = {0: 10, 1: 20, 2: 30}
    log = []

    def mk(i):
        return lambda: log.append(i) or vals[i]

    for k, i in zip(keys, range(3)):
        lowrank._fwd_weights(x, k, mk(i))
    lowrank._fwd_reset(x.device)
    log.clear()
    vals.update({0: 11, 1: 21, 2: 31})  # the optimizer's update: every build from here reads the new values
    # op 1's build issued ahead (on the up stream), then op 0's own (it has none built ahead: the first op)
    assert lowrank._fwd_weights(x, keys[0], mk(0)) == 11 and log == [1, 0]
    assert lowrank._fwd_weights(x, keys[1], mk(1)) == 21 and log == [1, 0, 2]  # taken; op 2's ahead
    assert lowrank._fwd_weights(x, keys[2], mk(2)) == 31 and log == [1, 0, 2]  # taken; the last op builds nothing
    lowrank._fwd_reset(x.device)
    log.clear()
    # op 1 skipped this time: op 0 builds op 1's ahead, op 2 finds it is not its own and builds its own
    assert lowrank._fwd_weights(x, keys[0], mk(0)) == 11 and log == [1, 0]
    assert lowrank._fwd_weights(x, keys[2], mk(2)) == 31 and log == [1, 0, 2]
    # the order last seen (0 → 2) is what the next forward builds ahead by; after a backward op 0 links to no op of
    # the last step (op 2 did not learn 0 as its next: the last op issues nothing)
    lowrank._fwd_reset(x.device)
    log.clear()
    assert lowrank._fwd_weights(x, keys[0], mk(0)) == 11 and log == [2, 0]
    assert lowrank._fwd_weights(x, keys[2], mk(2)) == 31 and log == [2, 0]


def test_depth_two_builds_two_ops_ahead(fresh_order, monkeypatch):
    """``LYCO_FORWARD_MERGED_DEPTH=2``: each op keeps the next two ops' builds in flight — issued once each, taken by
    their own op; builds for ops that do not come are dropped."""
    monkeypatch.setenv("LYCO_FORWARD_MERGED_DEPTH", "2")
    x = torch.zeros(1)
    keys = [torch.zeros(1) for _ in range(4)]
    log = []

    def mk(i):
        return lambda: log.append(i) or i * 10

    for i, k in enumerate(keys):
        lowrank._fwd_weights(x, k, mk(i))
    lowrank._fwd_reset(x.device)
    log.clear()
    assert lowrank._fwd_weights(x, keys[0], mk(0)) == 0 and log == [1, 2, 0]  # ops 1 and 2 ahead, then its own
    assert lowrank._fwd_weights(x, keys[1], mk(1)) == 10 and log == [1, 2, 0, 3]  # op 2's kept, op 3's issued
    assert lowrank._fwd_weights(x, keys[2], mk(2)) == 20 and log == [1, 2, 0, 3]
    assert lowrank._fwd_weights(x, keys[3], mk(3)) == 30 and log == [1, 2, 0, 3]
    lowrank._fwd_reset(x.device)
    log.clear()
    # ops 1 and 2 skipped: op 3 finds neither build its own and builds it
    assert lowrank._fwd_weights(x, keys[0], mk(0)) == 0 and log == [1, 2, 0]
    assert lowrank._fwd_weights(x, keys[3], mk(3)) == 30 and log == [1, 2, 0, 3]
    monkeypatch.setenv("LYCO_FORWARD_MERGED_DEPTH", "0")
    with pytest.raises(ValueError, match="LYCO_FORWARD_MERGED_DEPTH=0"):
        lowrank._fwd_weights(x, keys[0], mk(0))


class _Block(nn.Module):
    """q, k, v on one input (a group), an output projection, a two-layer MLP."""

    def __init__(self, d=16):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.is_cross_attention = False
        self.to_out = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        x = x + self.to_out(torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v)
        return x + self.fc2(torch.tanh(self.fc1(x)))


def _switch(monkeypatch, merged: bool):
    """The bypass op and the q/k/v group on, the merged forward on or off, a fresh order. The CPU has no up stream: a
    stand-in where the switch asks for one, and the forks and joins on it no-ops (the side stream stays None on the
    CPU), so that the op's own condition (_fwd_merged_on) decides, inside its forward."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setenv("LYCO_SHARED_INPUT", "1")
    monkeypatch.setenv("LYCO_FORWARD_MERGED", "1" if merged else "0")
    fake = object()
    monkeypatch.setattr(lowrank, "up_stream", lambda t: fake)
    for m in (lowrank, lowrank_shared):
        monkeypatch.setattr(m, "_fork", lambda side: _FORK(None if side is fake else side))
        monkeypatch.setattr(m, "_join", lambda side: _JOIN(None if side is fake else side))
    monkeypatch.setattr(lowrank, "_FWD_STATE", {})
    monkeypatch.setattr(lowrank, "_FWD_NODES", {})


def _train(merged: bool, monkeypatch, steps=3, model_cls=None):
    """Outputs, ∂x and the adapters' gradients of each of ``steps`` SGD steps (lr 1e-4) on ``Σ y²``, for two
    :class:`_Block` in a row (or ``model_cls()``)."""
    _switch(monkeypatch, merged)
    torch.manual_seed(0)
    model = model_cls() if model_cls is not None else nn.Sequential(_Block(), _Block())
    net = lyco.create(model, preset="full", algo="lora", rank=4, alpha=2, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randn(2, 12, 16, generator=g)
    out = []
    for _ in range(steps):
        xr = x.clone().requires_grad_(True)
        y = model(xr)
        y.square().sum().backward()
        out.append((y.detach(), xr.grad, {n: p.grad.clone() for n, p in net.named_parameters()}))
        with torch.no_grad():
            for p in net.trainable_parameters():
                p.sub_(1e-4 * p.grad)
                p.grad = None
    return out, model, net


def _assert_same_steps(merged, exact):
    """Each step's output, ∂x and every adapter gradient within fp32 rounding of the exact forward's."""
    assert len(merged) == len(exact)
    for i, ((y, gx, gp), (ry, rgx, rgp)) in enumerate(zip(merged, exact)):
        torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5, msg=f"step {i} y")
        torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-5, msg=f"step {i} dx")
        assert gp.keys() == rgp.keys()
        for n in gp:
            torch.testing.assert_close(gp[n], rgp[n], rtol=1e-5, atol=1e-5, msg=f"step {i} {n}")


@pytest.mark.parametrize("depth", ["1", "3"])
def test_steps_match_the_exact_forward_and_dense_math(monkeypatch, depth):
    monkeypatch.setenv("LYCO_FORWARD_MERGED_DEPTH", depth)
    merged, model, net = _train(True, monkeypatch)
    exact, _, _ = _train(False, monkeypatch)
    _assert_same_steps(merged, exact)
    # the last step's output in float64 from each layer's merged weight, the adapters as they were then
    params = {n: p.detach().double() for n, p in net.named_parameters()}
    with torch.no_grad():
        for n, p in net.named_parameters():  # undo the last update: the factors the last forward read
            params[n] = params[n] + 1e-4 * merged[-1][2][n].double()

    def lin(mod_name, m, t):
        pre = f"layers.{mod_name}"
        d, u = params[f"{pre}.params.lora_down__weight"], params[f"{pre}.params.lora_up__weight"]
        return t @ (m.weight.double() + 0.5 * u @ d).t() + m.bias.double()

    g = torch.Generator().manual_seed(3)
    for p in net.trainable_parameters():
        torch.randn(p.shape, generator=g)
    t = torch.randn(2, 12, 16, generator=g).double()
    for bi, blk in enumerate(model):
        nm = lambda s: f"model__{bi}__{s}"  # noqa: E731
        q, k, v = lin(nm("to_q"), blk.to_q, t), lin(nm("to_k"), blk.to_k, t), lin(nm("to_v"), blk.to_v, t)
        t = t + lin(nm("to_out"), blk.to_out, torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v)
        t = t + lin(nm("fc2"), blk.fc2, torch.tanh(lin(nm("fc1"), blk.fc1, t)))
    torch.testing.assert_close(merged[-1][0].double(), t, rtol=1e-5, atol=1e-5)


def test_ops_take_the_merged_forward(monkeypatch):
    """Every op of the step builds its forward weights (the group once for its three members), once per step."""
    calls = []
    real_p, real_g = lowrank._merged_params, lowrank_shared._merged_group

    def p_(*a):
        calls.append("single")
        return real_p(*a)

    def g_(*a):
        calls.append("group")
        return real_g(*a)

    monkeypatch.setattr(lowrank, "_merged_params", p_)
    monkeypatch.setattr(lowrank_shared, "_merged_group", g_)
    _train(True, monkeypatch, steps=2)
    # per step: 2 blocks × (group + to_out + fc2); fc1's 24 rows are fewer than its 32 outputs: the delta path there on
    # the CPU (lowrank.bypass_pays without side streams)
    assert calls.count("group") == 4 and calls.count("single") == 8


class _Ckpt(nn.Module):
    """Each block under activation checkpointing: its forward runs again inside the backward."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=False)
        return x


def test_checkpointed_steps_match_the_exact_forward(monkeypatch):
    """Under checkpointing the ops' forwards run again in the backward, between other ops' backwards, and learn and
    issue builds there too: three steps against the same steps with the exact forward."""
    merged, _, _ = _train(True, monkeypatch, model_cls=_Ckpt)
    exact, _, _ = _train(False, monkeypatch, model_cls=_Ckpt)
    _assert_same_steps(merged, exact)


def test_weak_build_holds_no_tensor_alive():
    """A node's build outlives its step: it holds the layer's tensors weakly (a dropped adapter's weights are freed)
    and returns None once one is gone; other arguments (a scale, a dtype, an absent bias) are passed as they are."""
    import gc
    import weakref
    w, d = torch.ones(3, 2), torch.full((1, 2), 2.0)
    build = lowrank._weak_build(lambda a, b, bias, s: a + s * b if bias is None else None, w, d, None, 0.5)
    torch.testing.assert_close(build(), torch.full((3, 2), 2.0))
    gone = weakref.ref(d)
    del d
    gc.collect()
    assert gone() is None and build() is None

"""Layers that read one input run as one op (``lyco/siblings.py``, ``algorithms/lowrank_shared.py``): outputs and
every gradient against independent float64 math, the groups found in the real model structures (diffusers'
attention, CLIP), the fallbacks (another input, an output nobody used, a changed adapter), checkpointing, mixed
precision and the gradient sink."""

import contextlib

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import lyco
from lyco import siblings
from lyco.algorithms import casts, lowrank_shared
from sink_helpers import AutogradAdds


@pytest.fixture(autouse=True)
def _paths_on(monkeypatch):
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setenv("LYCO_SHARED_INPUT", "1")


class Attn(nn.Module):
    """diffusers' naming; ``mode`` says what each projection reads."""

    def __init__(self, d=16, cross=False, mode="self", out=None):
        super().__init__()
        o = out or d
        self.to_q, self.to_k, self.to_v = nn.Linear(d, o), nn.Linear(d, o), nn.Linear(d, o)
        self.is_cross_attention = cross
        self.mode = mode

    def forward(self, x, ctx=None):
        q = self.to_q(x)
        if self.mode == "qk":  # v never called
            return torch.softmax(q @ self.to_k(x).transpose(-1, -2) / 4, -1) @ q
        kv = x if ctx is None else ctx
        if self.mode == "other":  # k and v read another tensor than q (the structure's claim is wrong)
            kv = x * 1.0
        k, v = self.to_k(kv), self.to_v(kv)
        return torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v


def _net(model, rank=8, seed=0, **kw):
    net = lyco.create(model, preset="full", algo="lora", rank=rank, alpha=rank / 2, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_((0.3 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return net


def _nodes(y):
    names, stack, seen = [], [y.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    return names


def _dense(model, net, x, ctx=None):
    """The attention of :class:`Attn` with each projection's merged weight W + (α/r)·U·D, float64, from the
    parameters (a separate autograd graph over clones of them)."""
    att = model[0]
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}

    def proj(name, t):
        lin = getattr(att, name)
        d = leaves[f"layers.model__0__{name}.params.lora_down__weight"]
        u = leaves[f"layers.model__0__{name}.params.lora_up__weight"]
        w = lin.weight.detach() + 0.5 * (u @ d)
        return t @ w.t() + lin.bias.detach()

    return attn_reference(att, proj, x, ctx) + (leaves,)


def attn_reference(att, proj, x, ctx=None, dtype=None):
    """``(y, ∂x, ∂ctx or None)`` of :class:`Attn`'s forward with ``proj(name, t)`` for its projections and the
    loss ``Σ y²``, by autograd over clones of x and ctx (in ``dtype`` where given) — the dense references' common
    part."""
    def leaf(t):
        return (t.detach() if dtype is None else t.detach().to(dtype)).clone().requires_grad_(True)

    xr = leaf(x)
    cr = None if ctx is None else leaf(ctx)
    q = proj("to_q", xr)
    if att.mode == "qk":
        y = torch.softmax(q @ proj("to_k", xr).transpose(-1, -2) / 4, -1) @ q
    else:
        kv = xr if cr is None else cr
        y = torch.softmax(q @ proj("to_k", kv).transpose(-1, -2) / 4, -1) @ proj("to_v", kv)
    y.square().sum().backward()
    return y.detach(), xr.grad, None if cr is None else cr.grad


def _check(model, net, x, ctx=None):
    y = model(x) if ctx is None else model[0](x, ctx)
    y.square().sum().backward()
    ry, rgx, rgc, leaves = _dense(model, net, x, ctx)
    torch.testing.assert_close(y, ry, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, rgx, rtol=1e-10, atol=1e-10)
    if ctx is not None:
        torch.testing.assert_close(ctx.grad, rgc, rtol=1e-10, atol=1e-10)
    for n, p in net.named_parameters():
        if leaves[n].grad is None:
            assert p.grad is None or not p.grad.any(), n
        else:
            torch.testing.assert_close(p.grad, leaves[n].grad, rtol=1e-10, atol=1e-10, msg=n)
    return y


def test_self_attention_q_k_v_as_one_op_equals_dense_math():
    model = nn.Sequential(Attn()).double()
    net = _net(model)
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    nodes = _nodes(_check(model, net, x))
    assert nodes.count("_SharedOpBackward") == 1 and "_BypassOpBackward" not in nodes


def _iter_fns(y):
    stack, seen = [y.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        yield fn
        stack.extend(f for f, _ in fn.next_functions)


def test_cross_attention_groups_k_and_v_on_the_context():
    model = nn.Sequential(Attn(cross=True)).double()
    net = _net(model)
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, 20, 16, dtype=torch.float64, requires_grad=True)
    y = _check(model, net, x, ctx)
    nodes = _nodes(y)
    assert nodes.count("_SharedOpBackward") == 1 and nodes.count("_BypassOpBackward") == 1  # q alone
    host = model[0].to_k._lyco_host
    assert host.group is model[0].to_v._lyco_host.group and model[0].to_q._lyco_host.group is None


def test_another_input_falls_back_and_stops_grouping():
    model = nn.Sequential(Attn(mode="other")).double()
    net = _net(model)
    group = model[0].to_q._lyco_host.group
    assert group is not None and not group.broken
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    y = _check(model, net, x)
    assert group.broken and "_SharedOpBackward" in _nodes(y)  # q's output came from the op, k and v their own
    x.grad = None
    net.zero_grad()
    y = _check(model, net, x)
    assert "_SharedOpBackward" not in _nodes(y)


def test_an_output_nobody_uses_gets_no_gradient():
    model = nn.Sequential(Attn(mode="qk")).double()
    net = _net(model)
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    for _ in range(2):  # v's output waits unused; the next round drops it without breaking the group
        x.grad = None
        net.zero_grad(set_to_none=True)
        y = _check(model, net, x)
        assert "_SharedOpBackward" in _nodes(y)
    assert not model[0].to_q._lyco_host.group.broken
    assert all(p.grad is None for n, p in net.named_parameters() if "to_v" in n)


def test_a_changed_multiplier_between_the_calls_is_honoured():
    model = nn.Sequential(Attn()).double()
    net = _net(model)
    att = model[0]
    x = torch.randn(2, 24, 16, dtype=torch.float64)
    y_q = att.to_q(x)
    group = att.to_q._lyco_host.group
    assert att.to_k._lyco_host in group._outs  # the round began: k's output waits, computed at multiplier 1
    net.set_multiplier(0.5)  # between q and k
    y_k = att.to_k(x)
    (a,) = att.to_k._lyco_host.adapters
    t = a.tensors()
    w = att.to_k.weight + 0.5 * 0.5 * (t["lora_up.weight"] @ t["lora_down.weight"])
    torch.testing.assert_close(y_k, x @ w.t() + att.to_k.bias, rtol=1e-10, atol=1e-10)
    assert att.to_k._lyco_host not in group._outs and not group.broken  # dropped, not taken; the group goes on


@pytest.mark.parametrize("early_stop", [True, False])
def test_checkpointed_attention_recomputes_the_group(early_stop):
    model = nn.Sequential(Attn()).double()
    net = _net(model)
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    ctx = torch.utils.checkpoint.set_checkpoint_early_stop(early_stop)
    with ctx:
        y = checkpoint(model, x, use_reentrant=False)
    assert "_SharedOpBackward" in _nodes(y)  # grouped in the first run (and its recomputation must save the same)
    y.square().sum().backward()
    ry, rgx, _, leaves = _dense(model, net, x)
    torch.testing.assert_close(y, ry, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, rgx, rtol=1e-10, atol=1e-10)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, leaves[n].grad, rtol=1e-10, atol=1e-10, msg=n)
    assert not model[0].to_q._lyco_host.group.broken


def test_policy_off_and_detach_unlink(monkeypatch):
    model = nn.Sequential(Attn()).double()
    net = _net(model)
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    monkeypatch.setenv("LYCO_SHARED_INPUT", "0")
    assert "_SharedOpBackward" not in _nodes(model(x))
    monkeypatch.setenv("LYCO_SHARED_INPUT", "1")
    assert "_SharedOpBackward" in _nodes(model(x))
    net.detach()
    assert getattr(model[0].to_q, "_lyco_host", None) is None
    net.attach()
    assert model[0].to_q._lyco_host.group is not None


def test_narrow_rows_take_each_layer_alone():
    """The bypass op's shape rule per member (rows ≥ out): too few rows, no member, no group."""
    model = nn.Sequential(Attn(out=64)).double()
    _net(model)
    x = torch.randn(1, 8, 16, dtype=torch.float64, requires_grad=True)
    assert "_SharedOpBackward" not in _nodes(model(x))


def test_real_models_group_their_attention_and_match_the_ungrouped_step(monkeypatch):
    """The tiny SD1.5 UNet and CLIP text encoder: every self-attention's q/k/v and every cross-attention's k/v
    (where the bypass op's rule takes them) as one op, outputs and gradients equal to each layer's own op."""
    from lyco.models.tiny import tiny_components

    def step(shared):
        monkeypatch.setenv("LYCO_SHARED_INPUT", shared)
        comps = tiny_components("sd1", seed=0, dtype=torch.float64)
        net = _net(comps, rank=4)
        unet, te = comps["unet"], comps["text_encoder"]
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(0, te.config.vocab_size, (2, 12), generator=g)
        ctx = te(ids)[0]
        cfg = unet.config
        lat = torch.randn(2, cfg.in_channels, 16, 16, generator=g, dtype=torch.float64)
        out = unet(lat, torch.tensor([10, 500]), ctx).sample
        out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in net.named_parameters()}, _nodes(out).count("_SharedOpBackward")

    y0, g0, n0 = step("0")
    y1, g1, n1 = step("1")
    assert n0 == 0 and n1 > 0
    torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-12)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert (g0[n] is None) == (g1[n] is None), n
        if g0[n] is not None:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-8, atol=1e-12, msg=n)


def test_groups_found_in_diffusers_and_clip_structures():
    from lyco.models.tiny import tiny_components
    comps = tiny_components("sd1", seed=0)
    lyco.create(comps, preset="full", algo="lora", rank=4)
    unet, te = comps["unet"], comps["text_encoder"]
    for name, m in unet.named_modules():
        if hasattr(m, "to_q"):
            g = m.to_k._lyco_host.group
            members = g.hosts if g is not None else ()
            if m.is_cross_attention:
                assert members == (m.to_k._lyco_host, m.to_v._lyco_host), name
            else:
                assert members == (m.to_q._lyco_host, m.to_k._lyco_host, m.to_v._lyco_host), name
    n = 0
    for m in te.modules():
        if hasattr(m, "q_proj"):
            assert m.q_proj._lyco_host.group.hosts == tuple(x._lyco_host for x in (m.q_proj, m.k_proj, m.v_proj))
            n += 1
    assert n == te.config.num_hidden_layers


def test_mixed_precision_close_to_the_ungrouped_op(monkeypatch):
    """An fp32 adapter on a bf16 layer under autocast (lyco train's mixed precision): the group against each
    layer's own op, within bf16 rounding, and both against float64."""
    def run(shared, sink):
        monkeypatch.setenv("LYCO_SHARED_INPUT", shared)
        torch.manual_seed(0)
        model = nn.Sequential(Attn(d=32)).to(torch.bfloat16)
        net = _net(model)
        for p in net.parameters():
            p.data = p.data.float()
        x = torch.randn(2, 40, 32, requires_grad=True)
        for p in net.trainable_parameters():
            p.grad = torch.zeros_like(p) if sink else None
        with torch.autocast("cpu", torch.bfloat16), casts.step_casts(grad_sink=sink):
            y = model(x)
            y.float().square().sum().backward()
        return y.float(), x.grad, [p.grad.clone() for p in net.trainable_parameters()]

    for sink in (False, True):
        a, b = run("0", sink), run("1", sink)
        torch.testing.assert_close(b[0], a[0], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(b[1], a[1], rtol=3e-2, atol=3e-2)
        for p, q in zip(b[2], a[2]):
            assert (p - q).norm() <= 2e-2 * q.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_sink_takes_the_groups_downs(monkeypatch, dtype):
    """With the sink the group adds its members' ∂D's (slices of its one stacked GEMM) into ``.grad`` itself
    (``lowrank._sink_add``) and its ∂U's by their GEMMs: no accumulation left to autograd over two micro-batches into
    kept gradients. The downs' gradients are the group's without the sink bit for bit (the same GEMM, then the add
    autograd's accumulation did); every factor within rounding of each layer's own op without the sink."""
    def run(shared, sink, rec=None):
        monkeypatch.setenv("LYCO_SHARED_INPUT", shared)
        torch.manual_seed(0)
        model = nn.Sequential(Attn(d=32)).to(dtype)
        net = _net(model, dtype=dtype)  # the adapter in the model's dtype: on the CPU no GEMM adds bf16 into fp32
        params = list(net.trainable_parameters())
        assert all(p.dtype == dtype for p in params)
        xs = [torch.randn(2, 40, 32, dtype=dtype), torch.randn(2, 40, 32, dtype=dtype)]
        for p in params:
            p.grad = torch.zeros_like(p)
        with rec or contextlib.nullcontext(), casts.step_casts(grad_sink=sink):
            for x in xs:
                model(x).float().square().sum().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}

    rec = AutogradAdds(monkeypatch)
    got = run("1", True, rec)
    # the three downs, two micro-batches (each layer's own op adds its ∂D by its GEMM: these are the group's)
    assert rec.outside == 0 and rec.inside == 2 * 3
    ref, unsunk = run("0", False), run("1", False)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the group's and each layer's own roundings differ
    for n, g in got.items():
        assert g.abs().sum() > 0
        assert (g.double() - ref[n].double()).norm() <= tol * ref[n].double().norm(), n
        if "down" in n:
            assert torch.equal(g, unsunk[n]), n
    assert sum("down" in n for n in got) == 3


def test_loha_khatri_rao_factors_group_like_their_own_ops(monkeypatch):
    """LoHa's bypass factors (its Khatri–Rao pair, built under autograd) through the group: outputs and the four
    factors' gradients equal to each layer's own op."""
    def run(shared):
        monkeypatch.setenv("LYCO_SHARED_INPUT", shared)
        torch.manual_seed(0)
        model = nn.Sequential(Attn(d=64)).double()
        net = lyco.create(model, preset="full", algo="loha", rank=4, alpha=2.0, seed=0)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in net.trainable_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        x = torch.randn(2, 40, 64, dtype=torch.float64, generator=g, requires_grad=True)
        y = model(x)
        y.square().sum().backward()
        return y.detach(), x.grad, [p.grad for p in net.trainable_parameters()], _nodes(y)

    a, b = run("0"), run("1")
    assert "_SharedOpBackward" in b[3] and "_SharedOpBackward" not in a[3]
    torch.testing.assert_close(b[0], a[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b[1], a[1], rtol=1e-10, atol=1e-12)
    for p, q in zip(b[2], a[2]):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def _stand_in_streams(monkeypatch, *names):
    """Recording stand-ins for CUDA streams (the CPU has none): ``main`` (the current stream) and one per name.
    Returns the log (``"A waits B"`` per wait), the current stream's name as ``cur[0]`` and the stand-ins by name."""
    import contextlib

    log, cur = [], ["main"]

    class St:
        def __init__(self, name):
            self.name, self.device = name, torch.device("cpu")

        def wait_stream(self, other):
            log.append(f"{self.name} waits {other.name}")

    st = {n: St(n) for n in ("main",) + names}

    @contextlib.contextmanager
    def on(s):
        prev, cur[0] = cur[0], s.name
        try:
            yield
        finally:
            cur[0] = prev

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: st["main"])
    monkeypatch.setattr(torch.cuda, "stream", on)
    return log, cur, st


def test_up_gradients_on_a_second_side_stream(monkeypatch):
    """``LYCO_SIDE_SPLIT`` (:func:`lyco.algorithms.lowrank.up_stream`): the group's ∂U GEMMs on their own stream
    beside the ∂h → ∂D chain on the side stream, each forked from the current stream before its products and
    joined after them, before the op returns; ∂x on the current stream. Recording stand-ins for the streams (the
    CPU has none); values against the float64 math of :func:`_dense`."""
    log, cur, st = _stand_in_streams(monkeypatch, "side", "up")
    monkeypatch.setattr(lowrank_shared, "side_stream", lambda t: st["side"])
    monkeypatch.setattr(lowrank_shared, "up_stream", lambda t: st["up"])
    real_mm, real_merged = lowrank_shared._mm, lowrank_shared._merged

    def mm(a, b, *k, **kw):  # ∂U: (out, rows)·(rows, r); ∂D: (Σr, rows)·(rows, in)
        log.append(("dU" if b.shape[1] == 8 else "dD") + "@" + cur[0])
        return real_mm(a, b, *k, **kw)

    monkeypatch.setattr(lowrank_shared, "_mm", mm)
    monkeypatch.setattr(lowrank_shared, "_merged", lambda *a, **k: log.append("merge@" + cur[0]) or real_merged(*a, **k))
    model = nn.Sequential(Attn()).double()
    net = _net(model)
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    _check(model, net, x)
    assert log.count("dU@up") == 3 and log.count("dD@side") == 1 and log.count("merge@main") == 3, log
    assert not any(e.startswith(("dU@", "dD@")) and not e.endswith(("@up", "@side")) for e in log), log
    for prod, st in (("dU@up", "up"), ("dD@side", "side")):
        first, last = log.index(prod), len(log) - 1 - log[::-1].index(prod)
        assert log.index(f"{st} waits main") < first and last < log.index(f"main waits {st}"), log
    assert set(log[-2:]) == {"main waits side", "main waits up"}, log


def test_forward_down_on_the_side_stream(monkeypatch):
    """``LYCO_FORWARD_SIDE``: the group's one down GEMM on the side stream (forked before it), every member's frozen
    GEMM on the current stream beside it, joined before the first up's add; values against :func:`_dense`'s
    float64 math. Recording stand-ins for the streams (the CPU has none)."""
    import torch.nn.functional as F

    log, cur, st = _stand_in_streams(monkeypatch, "side")
    monkeypatch.setattr(lowrank_shared, "_forward_side", lambda t: st["side"])
    real_linear = F.linear
    monkeypatch.setattr(lowrank_shared.F, "linear", lambda x, w, b=None: log.append(
        ("down" if w.shape[0] == 24 else "frozen") + "@" + cur[0]) or real_linear(x, w, b))
    model = nn.Sequential(Attn()).double()
    net = _net(model)
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    _check(model, net, x)
    assert log == ["side waits main", "down@side", "frozen@main", "frozen@main", "frozen@main", "main waits side"], log

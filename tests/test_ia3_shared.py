"""(IA)³ output-mode layers that read one input as one op (``ia3._SharedKeepOutput`` through ``lyco/siblings.py``)
and the multi-member launches of ``scale_triton`` (Triton's interpreter): outputs and every gradient against float64
math written here — ``y_i = x·(W_i ⊙ (1 + m·w_i))ᵀ + b_i`` by autograd — and the real tiny models' step against each
layer's own op."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import lyco
from lyco.algorithms import ia3
from regen_helpers import kept_by_forward
from test_shared_input import Attn, _nodes, attn_reference


@pytest.fixture(autouse=True)
def _paths_on(monkeypatch):
    monkeypatch.setenv("LYCO_SHARED_INPUT", "1")
    monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT", "1")
    monkeypatch.setenv("LYCO_IA3_KEEP_OUTPUT_MIN_IN", "0")


def _net(model, seed=0):
    net = lyco.create(model, preset="full", algo="ia3", seed=seed)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_((0.4 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return net


def _dense(model, net, x, m, ctx=None):
    """:class:`Attn` with every projection's ``W ⊙ (1 + m·w)`` rows, float64 autograd over clones of the leaves."""
    att = model[0]
    leaves = {n: p.detach().double().clone().requires_grad_(True) for n, p in net.named_parameters()}

    def proj(name, t):
        lin = getattr(att, name)
        w = leaves[f"layers.model__0__{name}.params.weight"]
        y = t @ (lin.weight.detach().double() * (1 + m * w)[:, None]).t()
        return y if lin.bias is None else y + lin.bias.detach().double()

    return attn_reference(att, proj, x, ctx, torch.float64) + (leaves,)


def _check(model, net, x, m=1.0, ctx=None, tol=1e-10):
    y = model(x) if ctx is None else model[0](x, ctx)
    y.square().sum().backward()
    ry, rgx, rgc, leaves = _dense(model, net, x, m, ctx)
    torch.testing.assert_close(y.double(), ry, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), rgx, rtol=tol, atol=tol)
    if ctx is not None:
        torch.testing.assert_close(ctx.grad.double(), rgc, rtol=tol, atol=tol)
    for n, p in net.named_parameters():
        if leaves[n].grad is None:
            assert p.grad is None or not p.grad.any(), n
        else:
            torch.testing.assert_close(p.grad.double(), leaves[n].grad, rtol=tol, atol=tol, msg=n)
    return y


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m", [1.0, 0.7])
def test_self_attention_q_k_v_as_one_op_equals_dense_math(bias, m):
    model = nn.Sequential(Attn()).double()
    if not bias:
        for name in ("to_q", "to_k", "to_v"):
            setattr(model[0], name, nn.Linear(16, 16, bias=False).double())
    net = _net(model)
    net.set_multiplier(m)
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    nodes = _nodes(_check(model, net, x, m))
    assert nodes.count("_SharedKeepOutputBackward") == 1 and "_KeepOutputBackward" not in nodes


def test_cross_attention_groups_k_and_v_on_the_context():
    model = nn.Sequential(Attn(cross=True)).double()
    net = _net(model)
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(2, 20, 16, dtype=torch.float64, requires_grad=True)
    nodes = _nodes(_check(model, net, x, ctx=ctx))
    assert nodes.count("_SharedKeepOutputBackward") == 1 and nodes.count("_KeepOutputBackward") == 1  # q alone


def test_an_output_nobody_uses_gets_no_gradient():
    model = nn.Sequential(Attn(mode="qk")).double()
    net = _net(model)
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    for _ in range(2):
        x.grad = None
        net.zero_grad(set_to_none=True)
        assert "_SharedKeepOutputBackward" in _nodes(_check(model, net, x))
    assert not model[0].to_q._lyco_host.group.broken
    assert all(p.grad is None for n, p in net.named_parameters() if "to_v" in n)


def test_the_group_keeps_one_output_and_no_input():
    """Saved for backward: the one output the members' outputs are views of — nothing of x's size."""
    model = nn.Sequential(Attn(d=40, out=24)).double()
    _net(model)
    x = torch.randn(64, 40, dtype=torch.float64, requires_grad=True)
    seen = []
    orig = ia3._SharedKeepOutput.apply
    ia3._SharedKeepOutput.apply = lambda *a: seen.append(orig(*a)) or seen[-1]
    try:
        _, acts = kept_by_forward(lambda: (model[0].to_q(x), model[0].to_k(x), model[0].to_v(x)), 64 * 24)
    finally:
        ia3._SharedKeepOutput.apply = orig
    (outs,) = seen
    assert [tuple(t.shape) for t in acts] == [(64, 72)]
    assert all(o._base is acts[0] for o in outs)


def test_a_member_left_out_runs_its_own_op(monkeypatch):
    """A member that would not take the output-keeping op (a trainable base weight) computes its own; the others
    still group — and a changed multiplier on one member (unequal s) makes each run its own op."""
    model = nn.Sequential(Attn()).double()
    net = _net(model)
    model[0].to_v.weight.requires_grad_(True)
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    nodes = _nodes(model(x))
    assert nodes.count("_SharedKeepOutputBackward") == 1 and "_RebuiltOpBackward" in nodes
    model[0].to_v.weight.requires_grad_(False)
    next(a for a in model[0].to_k._lyco_host.adapters).multiplier = 0.5
    y = model(x)
    assert "_SharedKeepOutputBackward" not in _nodes(y) and _nodes(y).count("_KeepOutputBackward") == 3
    assert not model[0].to_q._lyco_host.group.broken


def test_inplace_change_of_a_member_output_is_refused():
    model = nn.Sequential(Attn()).double()
    _net(model)
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    q = model[0].to_q(x)
    with pytest.raises(RuntimeError, match="view"):
        q.mul_(2)


def test_checkpointed_attention_recomputes_the_group():
    model = nn.Sequential(Attn()).double()
    net = _net(model)
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    y = checkpoint(model, x, use_reentrant=False)
    assert "_SharedKeepOutputBackward" in _nodes(y)
    y.square().sum().backward()
    ry, rgx, _, leaves = _dense(model, net, x, 1.0)
    torch.testing.assert_close(y, ry, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, rgx, rtol=1e-10, atol=1e-10)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, leaves[n].grad, rtol=1e-10, atol=1e-10, msg=n)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_real_models_match_the_ungrouped_step(monkeypatch, kind):
    """The tiny UNets and text encoders: every self-attention's q/k/v and cross-attention's k/v as one op, outputs
    and gradients equal to each layer's own output-keeping op."""
    from lyco.models.tiny import tiny_components
    from regen_helpers import tiny_sdxl_loss, tiny_sdxl_step_inputs

    def step(shared):
        monkeypatch.setenv("LYCO_SHARED_INPUT", shared)
        comps = tiny_components(kind, seed=0, dtype=torch.float64)
        net = _net(comps)
        g = torch.Generator().manual_seed(5)
        if kind == "sdxl":
            ids, inputs = tiny_sdxl_step_inputs(comps, g)
            counted = []
            orig = ia3._SharedKeepOutput.apply
            monkeypatch.setattr(ia3._SharedKeepOutput, "apply", lambda *a: counted.append(1) or orig(*a))
            loss = tiny_sdxl_loss(comps, ids, inputs)
            n = len(counted)
        else:
            unet, te = comps["unet"], comps["text_encoder"]
            ids = torch.randint(0, te.config.vocab_size, (2, 12), generator=g)
            lat = torch.randn(2, unet.config.in_channels, 16, 16, generator=g, dtype=torch.float64)
            out = unet(lat, torch.tensor([10, 500]), te(ids)[0]).sample
            loss = out.square().mean()
            n = _nodes(loss).count("_SharedKeepOutputBackward")
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in net.named_parameters()}, n

    l0, g0, n0 = step("0")
    l1, g1, n1 = step("1")
    assert n0 == 0 and n1 > 0
    torch.testing.assert_close(l1, l0, rtol=1e-11, atol=0)
    assert g0.keys() == g1.keys()
    for k in g0:
        assert (g0[k] is None) == (g1[k] is None), k
        if g0[k] is not None:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-8, atol=1e-12, msg=k)


# -- the multi-member launches (Triton's interpreter) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def kern(triton_interpreter):
    from lyco.algorithms import lowrank_triton, scale_triton
    assert lowrank_triton._UPCAST, "Triton was imported before tests/conftest.py set TRITON_INTERPRET"
    saved = dict(scale_triton._BUILD_CFG)
    scale_triton._BUILD_CFG.update(BLOCK=256)  # members spanning several programs, ragged last blocks
    yield scale_triton
    scale_triton._BUILD_CFG.clear()
    scale_triton._BUILD_CFG.update(saved)


@pytest.mark.parametrize("rows", [(40, 33), (40, 33, 300), (7,)])
@pytest.mark.parametrize("s", [1.0, 0.5])
def test_scale_rows_multi_matches_each_layers_rows(kern, rows, s):
    """The stacked W′: member i's rows are ``W_i + W_i ⊙ (s·w_i)`` — within one unit in the last place of the exact
    value (float64; w drawn in bf16 and s a power of two so that only W′'s own rounding is left: the interpreter
    truncates where the GPU rounds), and bit for bit what the one-layer launch writes for that member (members
    spanning several programs, ragged last blocks: the offsets)."""
    g = torch.Generator().manual_seed(sum(rows))
    ws = [torch.randn(r, 77, generator=g).to(torch.bfloat16) for r in rows]
    wvs = [(0.3 * torch.randn(r, generator=g)).to(torch.bfloat16).float() for r in rows]
    got = kern.scale_rows_multi(ws, wvs, s)
    assert got.shape == (sum(rows), 77) and got.dtype == torch.bfloat16
    exact = torch.cat([w.double() * (1 + s * v.double())[:, None] for w, v in zip(ws, wvs)])
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact)[1] - 8)  # bf16: 8 significant bits
    assert ((got.double() - exact).abs() <= ulp).all()
    if len(rows) > 1:
        assert torch.equal(got, torch.cat([kern.scale_rows(w, v, s) for w, v in zip(ws, wvs)]))


@pytest.mark.parametrize("cs", [(33, 40), (24, 24, 24), (5, 300, 17)])
@pytest.mark.parametrize("bias", [True, False])
def test_channel_grad_of_stacked_outputs(kern, cs, bias):
    """``∂w_i = s·Σ_n ∂y_i·(y_i − b_i) / (1 + s·w_i)`` for every member from one partial pass over the stacked ∂y and
    y (float64 reference from the same stored values), each result in its vector's shape; with the weights, the
    stacked W′ of :func:`scale_rows_multi` from the same launch."""
    g = torch.Generator().manual_seed(sum(cs))
    c, n, s = sum(cs), 300, 0.7
    gy = torch.randn(n, c, generator=g).to(torch.bfloat16)
    y = torch.randn(n, c, generator=g).to(torch.bfloat16)
    b = torch.randn(c, generator=g).to(torch.bfloat16) if bias else None
    wvs = [0.3 * torch.randn(k, generator=g) for k in cs]
    wvs[-1] = wvs[-1].reshape(1, -1, 1)  # a conv-shaped vector keeps its shape
    ws = [torch.randn(k, 9, generator=g).to(torch.bfloat16) for k in cs]
    v = y.double() - (b.double() if bias else 0)
    d = 1 + s * torch.cat([w.reshape(-1) for w in wvs]).double()
    ref = s * (gy.double() * v).sum(0) / d
    got = kern.channel_grad(gy, y, b, tuple(wvs), s)
    assert [tuple(t.shape) for t in got] == [tuple(w.shape) for w in wvs]
    flat = torch.cat([t.reshape(-1) for t in got]).double()
    assert ((flat - ref).abs().max() / ref.abs().max()).item() < 1e-5
    both, w2 = kern.channel_grad(gy, y, b, tuple(wvs), s, tuple(ws))
    assert all(torch.equal(p, q) for p, q in zip(both, got))
    assert torch.equal(w2, kern.scale_rows_multi(ws, wvs, s))


def test_multi_member_launch_limits(kern):
    w = torch.zeros(4, 3, dtype=torch.bfloat16)
    v = torch.zeros(4)
    with pytest.raises(ValueError, match="at most 3"):
        kern.scale_rows_multi([w] * 4, [v] * 4, 1.0)
    with pytest.raises(ValueError, match="one row length"):
        kern.scale_rows_multi([w, torch.zeros(4, 5, dtype=torch.bfloat16)], [v, v], 1.0)
    with pytest.raises(ValueError, match="add up to the columns"):
        kern.channel_finish(torch.zeros(2, 9), (v, v), 1.0)


def test_under_autocast_as_each_layers_own_op(monkeypatch):
    """The trainer's mixed precision (fp32 model and vectors, bf16 autocast, an fp32 input): the group's GEMM in bf16
    like each layer's own op, gradients back in their tensors' dtypes, within bf16 rounding of the float64 math."""
    def run(shared):
        monkeypatch.setenv("LYCO_SHARED_INPUT", shared)
        torch.manual_seed(0)
        model = nn.Sequential(Attn(d=32))
        net = _net(model)
        x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(7), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        assert x.grad.dtype == torch.float32
        return model, net, x, y, _nodes(y)

    model, net, x, y, nodes = run("1")
    assert "_SharedKeepOutputBackward" in nodes
    ry, rgx, _, leaves = _dense(model, net, x, 1.0)
    assert ((y.double() - ry).norm() / ry.norm()).item() < 1e-2
    assert ((x.grad.double() - rgx).norm() / rgx.norm()).item() < 2e-2
    for n, p in net.named_parameters():
        assert p.grad.dtype == torch.float32
        assert ((p.grad.double() - leaves[n].grad).norm() / leaves[n].grad.norm()).item() < 2e-2, n
    _, _, x0, y0, nodes0 = run("0")
    assert "_SharedKeepOutputBackward" not in nodes0
    assert ((y.float() - y0.float()).norm() / y0.float().norm()).item() < 1e-2

"""An adapted linear layer's input regenerated in backward from its producer's kept tensors (``algorithms/regen.py``,
``LYCO_INPUT_REGEN``): the same gradients as with the input kept — bit for bit, and against independent float64
math — the input itself no longer among the op's saved tensors, and every condition under which it must be kept."""

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from regen_helpers import (adapted, record_regen_hits, saved_storages, tiny_sdxl_lora, tiny_sdxl_loss,
                           tiny_sdxl_step_inputs)
from lyco.algorithms import graph_policy, lowrank, regen


class GEGLUFeedForward(nn.Module):
    """diffusers' ``FeedForward`` with GEGLU, as its forward computes it: proj → chunk → a ⊙ gelu(g) → out."""

    def __init__(self, d=12, inner=16, act="geglu"):
        super().__init__()
        self.act = act
        self.proj = nn.Linear(d, 2 * inner if act == "geglu" else inner)
        self.out = nn.Linear(inner, d)
        self.seen = []

    def forward(self, x):
        h = self.proj(x)
        if self.act == "geglu":
            a, g = h.chunk(2, dim=-1)
            z = a * F.gelu(g)
        elif self.act == "quick_gelu":  # CLIP-L's
            z = h * torch.sigmoid(1.702 * h)
        elif self.act == "gelu_tanh":
            z = F.gelu(h, approximate="tanh")
        else:
            z = F.silu(h)
        self.seen.append(z)
        return self.out(z)


def _setup(act="geglu", seed=0):
    torch.manual_seed(seed)
    model = GEGLUFeedForward(act=act).double()
    return model, adapted(model, seed)


def _out_node(y):
    fn = y.grad_fn
    if fn.name() in ("ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0"):
        fn = fn.next_functions[0][0]
    return fn


def _step(model, net, x, gy):
    model.seen.clear()
    y = model(x)
    params = list(net.trainable_parameters())
    node = _out_node(y)
    saved = saved_storages(y)
    grads = torch.autograd.grad(y, [x] + params, gy)
    return y, grads, node, saved


@pytest.fixture(params=["op", "delta"])
def op_everywhere(request, monkeypatch):
    """The bypass op on every layer (the captured steps' path), or the delta path (eager steps': LoRA's down)."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1" if request.param == "op" else "0")
    monkeypatch.delenv("LYCO_BYPASS_OP_KINDS", raising=False)
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    monkeypatch.path = request.param
    return monkeypatch


def _reference(model, net, x, gy, act):
    """The feed-forward with both layers' merged weights ``W + (α/r)·U·D`` in float64, by plain autograd."""
    params = list(net.trainable_parameters())
    leaves = [p.detach().clone().requires_grad_() for p in params]
    ids = {id(p): i for i, p in enumerate(params)}

    def merged(layer):
        (a,) = layer._lyco_host.adapters
        t = a.tensors()
        up, down = leaves[ids[id(t["lora_up.weight"])]], leaves[ids[id(t["lora_down.weight"])]]
        return layer.weight.detach() + (float(t["alpha"]) / down.shape[0]) * up @ down

    xr = x.detach().clone().requires_grad_()
    h = F.linear(xr, merged(model.proj), model.proj.bias)
    if act == "geglu":
        a, g = h.chunk(2, dim=-1)
        z = a * F.gelu(g)
    elif act == "quick_gelu":
        z = h * torch.sigmoid(1.702 * h)
    elif act == "gelu_tanh":
        z = F.gelu(h, approximate="tanh")
    else:
        z = F.silu(h)
    y = F.linear(z, merged(model.out), model.out.bias)
    return y, torch.autograd.grad(y, [xr] + leaves, gy)


@pytest.mark.parametrize("act", ["geglu", "quick_gelu", "gelu_tanh", "silu"])
def test_regenerated_input_gives_the_kept_inputs_gradients_and_is_not_kept(op_everywhere, act):
    model, net = _setup(act)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 5, 12, dtype=torch.float64)
    op_everywhere.setenv("LYCO_INPUT_REGEN", "0")
    y0, g0, node0, saved0 = _step(model, net, x, gy)
    z0 = model.seen[0]
    op_everywhere.setenv("LYCO_INPUT_REGEN", "1")
    y1, g1, node1, saved1 = _step(model, net, x, gy)
    z1 = model.seen[0]
    if op_everywhere.path == "op":
        assert node0.name() == node1.name() == "_BypassOpBackward"
    else:
        assert node0.name() == node1.name() == "AddmmBackward0"  # base + up·h, one GEMM (accumulate_linear)
    # kept: the op saved the product's storage; regenerated: it did not (what it keeps are the producer's tensors)
    assert z0.untyped_storage().data_ptr() in saved0
    assert z1.untyped_storage().data_ptr() not in saved1
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    yr, gr = _reference(model, net, x, gy, act)
    torch.testing.assert_close(y1, yr, rtol=1e-10, atol=1e-10)
    for a, b in zip(g1, gr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_regeneration_is_bitwise_in_bf16(op_everywhere):
    """bf16, where a regenerated product that differed in one rounding would change ∂D's bits."""
    model, net = _setup("geglu")
    model.to(torch.bfloat16)
    x = torch.randn(3, 7, 12, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(3, 7, 12, dtype=torch.bfloat16)
    op_everywhere.setenv("LYCO_INPUT_REGEN", "0")
    _, g0, _, _ = _step(model, net, x, gy)
    op_everywhere.setenv("LYCO_INPUT_REGEN", "1")
    _, g1, _, saved1 = _step(model, net, x, gy)
    assert model.seen[0].untyped_storage().data_ptr() not in saved1
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


def test_default_policy_regenerates_everywhere(op_everywhere):
    """Unset: on in eager steps and in graph steps alike; ``graph`` confines it to graph steps; a typo is an error."""
    model, net = _setup("geglu")
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 5, 12, dtype=torch.float64)
    op_everywhere.delenv("LYCO_INPUT_REGEN", raising=False)
    for ctx in (contextlib.nullcontext(), graph_policy.graph_step()):
        with ctx:
            _, _, _, saved = _step(model, net, x, gy)
        assert model.seen[0].untyped_storage().data_ptr() not in saved
    op_everywhere.setenv("LYCO_INPUT_REGEN", "graph")
    _, _, _, saved = _step(model, net, x, gy)
    assert model.seen[0].untyped_storage().data_ptr() in saved
    with graph_policy.graph_step():
        _, _, _, saved = _step(model, net, x, gy)
    assert model.seen[0].untyped_storage().data_ptr() not in saved
    op_everywhere.setenv("LYCO_INPUT_REGEN", "yes")
    with pytest.raises(ValueError, match="LYCO_INPUT_REGEN"):
        regen.find(x * x)


def test_delta_path_under_autocast_sends_each_gradient_in_its_inputs_dtype(monkeypatch):
    """CPU autocast (bf16) over a float32 model: the down's product in bf16 as the layer's own ``F.linear``, each
    gradient back in its input's dtype — equal to the kept input's."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "0")
    model, net = _setup("geglu")
    model.float()
    x = torch.randn(2, 5, 12, requires_grad=True)
    gy = torch.randn(2, 5, 12)
    out = []
    for flag in ("0", "1"):
        monkeypatch.setenv("LYCO_INPUT_REGEN", flag)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, grads, _, saved = _step(model, net, x, gy)
        assert (model.seen[0].untyped_storage().data_ptr() in saved) == (flag == "0")
        out.append((y, grads))
    want = [x.dtype] + [p.dtype for p in net.trainable_parameters()]
    assert [g.dtype for g in out[1][1]] == want  # (the adapter's float64 parameters: _setup made them so)
    assert torch.equal(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_saved_tensor_hooks_keep_the_input(op_everywhere):
    """Under saved-tensor hooks (non-reentrant checkpointing, offloading) the producer's tensors are not unpacked."""
    op_everywhere.setenv("LYCO_INPUT_REGEN", "1")
    a = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, 6, requires_grad=True)
    z = a * b
    assert regen.find(z) is not None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert regen.find(z) is None
    model, net = _setup("geglu")
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 5, 12, dtype=torch.float64)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        y, grads, _, _ = _step(model, net, x, gy)
    yr, gr = _reference(model, net, x, gy, "geglu")
    for g, r in zip(grads, gr):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_what_cannot_be_regenerated(monkeypatch):
    monkeypatch.setenv("LYCO_INPUT_REGEN", "1")
    a = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, 6, requires_grad=True)
    c = torch.randn(4, 6)  # no gradient: the mul keeps only c, not a
    assert regen.find(a * c) is None
    assert regen.find(a * b[:1]) is None  # broadcast: an operand of another shape
    assert regen.find(a + b) is None  # not a producer it knows
    assert regen.find(a) is None  # a leaf
    z = a * b
    z.mul_(2)  # modified in place: no longer what the mul made
    assert regen.find(z) is None
    z = a * b
    a2 = a.detach()
    a2.add_(1)  # the mul's kept operand modified in place: unpacking it raises, x is kept
    assert regen.find(z) is None
    w = (a * b).t()  # a view that is not the whole contiguous product
    assert regen.find(w) is None
    z = a * b
    found = regen.find(z.reshape(-1))  # the 2-D/1-D rows a layer host makes: the view's base
    assert found is not None and torch.equal(found[0].value(found[1]), z.reshape(-1))
    g = F.gelu(a, approximate="tanh")
    found = regen.find(g)
    assert found is not None and found[0].param == "tanh" and torch.equal(found[0].value(found[1]), g)


def test_linear_with_an_input_autocast_casts(monkeypatch):
    """An fp32 input under bf16 autocast (the product computed in bf16 by the Function's own ``F.linear``): ∂x and ∂w
    go back in float32, equal to autograd's through autocast's casts."""
    monkeypatch.setenv("LYCO_INPUT_REGEN", "1")
    g = torch.Generator().manual_seed(4)
    a = torch.randn(6, 10, generator=g, requires_grad=True)
    w = torch.randn(3, 10, generator=g, requires_grad=True)
    gh = torch.randn(6, 3, generator=g)
    out = []
    for fn in (torch.nn.functional.linear, regen.linear):
        a.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = F.silu(a)
            h = fn(x, w)
        h.backward(gh.to(h.dtype))
        out.append((h, a.grad, w.grad))
    assert out[1][0].grad_fn.name() == "_RegenLinearBackward"
    assert out[0][0].dtype == out[1][0].dtype == torch.bfloat16
    for r, t in zip(out[0], out[1]):
        assert r.dtype == t.dtype
        torch.testing.assert_close(t, r, rtol=1e-2, atol=1e-2)


def test_the_tiny_sdxl_regenerates_every_feed_forward_input(monkeypatch):
    """The real model code the regeneration relies on (diffusers' GEGLU, transformers' quick-GELU and GELU): on the
    tiny SDXL — UNet and both text encoders, LoRA on every layer, eager steps — every ``ff.net.2`` and ``mlp.fc2``
    input is regenerated, and every adapter gradient equals the kept inputs' bit for bit."""
    comps, params, g = tiny_sdxl_lora()
    ffn = {n: m for c in comps.values() for n, m in c.named_modules() if n.endswith(("ff.net.2", "mlp.fc2"))}
    assert len(ffn) >= 8
    seen = {}
    for n, m in ffn.items():
        m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, id(args[0])))
    hits = record_regen_hits(monkeypatch)
    ids, inputs = tiny_sdxl_step_inputs(comps, g)

    def grads():
        seen.clear()
        hits.clear()
        return torch.autograd.grad(tiny_sdxl_loss(comps, ids, inputs), params, allow_unused=True)

    monkeypatch.setenv("LYCO_INPUT_REGEN", "0")
    g0 = grads()
    assert not hits
    monkeypatch.setenv("LYCO_INPUT_REGEN", "1")
    g1 = grads()
    assert set(seen) == set(ffn) and set(seen.values()) <= hits, sorted(set(ffn) - {
        n for n, i in seen.items() if i in hits})
    for a, b in zip(g0, g1):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("act", ["geglu", "quick_gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bypass_op_reads_a_products_operands_with_the_kernel(monkeypatch, triton_interpreter, act, dtype):
    """``LYCO_REGEN_KERNEL``: the bypass op's ∂D of a product's input from its two operands by
    ``regen_triton.weight_grad`` (interpreted here, its CUDA condition forced) — once per step, for the layer
    after the product only; every other gradient bit for bit the mul-and-GEMM form's, the down's within the sums'
    order (fp32) or the interpreter's truncating bf16 rounding of the product; with the trainer's sink, added into
    ``.grad`` by the kernel and equal to what it returns."""
    from lyco.algorithms import casts, regen_triton
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.delenv("LYCO_BYPASS_OP_KINDS", raising=False)
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    monkeypatch.setenv("LYCO_INPUT_REGEN", "1")
    monkeypatch.setattr(regen_triton, "usable", lambda ops, r: True)
    calls, real = [], regen_triton.weight_grad
    monkeypatch.setattr(regen_triton, "weight_grad", lambda *a: calls.append(a[4] is not None) or real(*a))
    model, net = _setup(act)
    model.to(dtype)
    x = torch.randn(3, 70, 12, dtype=dtype, requires_grad=True)
    gy = torch.randn(3, 70, 12, dtype=dtype)
    params = list(net.trainable_parameters())
    (ad,) = model.out._lyco_host.adapters
    idx = 1 + [id(p) for p in params].index(id(ad.tensors()["lora_down.weight"]))
    monkeypatch.setenv("LYCO_REGEN_KERNEL", "0")
    y0, g0, _, _ = _step(model, net, x, gy)
    assert calls == []
    monkeypatch.setenv("LYCO_REGEN_KERNEL", "1")
    y1, g1, node, _ = _step(model, net, x, gy)
    assert node.name() == "_BypassOpBackward" and calls == [False]
    assert torch.equal(y0, y1)
    for i, (a, b) in enumerate(zip(g0, g1)):
        if i != idx:
            assert torch.equal(a, b)
    assert not torch.equal(g0[idx], g1[idx]) or dtype == torch.float32  # the kernel's own sums (bf16: rounding)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((g1[idx].double() - g0[idx].double()).abs().max() / g0[idx].double().abs().max()).item() < tol
    if dtype == torch.float32:  # the sink needs a gradient the GEMMs can add into: fp32 factors (_setup's are fp64)
        for p in params:
            p.data = p.data.float()
            p.grad = torch.zeros_like(p)
        calls.clear()
        _, g2, _, _ = _step(model, net, x, gy)
        with casts.step_casts(grad_sink=True):
            model(x).backward(gy)
        assert calls == [False, True]
        assert torch.equal(params[idx - 1].grad, g2[idx])

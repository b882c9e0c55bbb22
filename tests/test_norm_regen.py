"""A layer norm's output regenerated in backward from what the norm keeps (``regen._find_norm``, ``LYCO_NORM_REGEN``):
the bypass op and the shared-input op keep the norm's input, mean and 1/σ (kept by the norm's own backward anyway)
instead of their input; gradients against the kept input's and against float64 math, the policy (captured steps by
default; never on the eager delta path), the kernel path, and the tiny SDXL's norms."""

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lyco
from regen_helpers import (record_regen_hits, saved_storages, tiny_sdxl_lora, tiny_sdxl_loss,
                           tiny_sdxl_step_inputs)
from lyco.algorithms import graph_policy, lowrank, regen, regen_triton


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.is_cross_attention = False

    def forward(self, x):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v


class Block(nn.Module):
    """norm1 → q/k/v (one shared-input group), norm2 → ff (one bypass op), as a transformer block reads its norms."""

    def __init__(self, d=16, affine=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=affine)
        self.attn = Attn(d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=affine)
        self.ff = nn.Linear(d, 3 * d)
        self.seen = []

    def forward(self, x):
        n1 = self.norm1(x)
        h = x + self.attn(n1)
        n2 = self.norm2(h)
        self.seen[:] = [n1, n2]
        return self.ff(n2)


@pytest.fixture
def paths(monkeypatch):
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setenv("LYCO_SHARED_INPUT", "1")
    monkeypatch.delenv("LYCO_BYPASS_OP_KINDS", raising=False)
    monkeypatch.delenv("LYCO_NORM_REGEN", raising=False)
    monkeypatch.delenv("LYCO_INPUT_REGEN", raising=False)
    monkeypatch.setenv("LYCO_NORM_REGEN_MIN", "0")  # the tiny models' norm outputs are far under the default size
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    return monkeypatch


def _setup(dtype=torch.float64, affine=True, seed=0):
    torch.manual_seed(seed)
    model = Block(affine=affine)
    if affine:
        with torch.no_grad():  # norms that are not the identity's γ = 1, β = 0
            for m in (model.norm1, model.norm2):
                m.weight.add_(0.5 * torch.randn_like(m.weight))
                m.bias.add_(0.5 * torch.randn_like(m.bias))
    model.to(dtype)
    net = lyco.create(model, preset="full", algo="lora", rank=3, alpha=2.0, seed=seed)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.data = (p + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype)).to(dtype)
    return model, net


def _step(model, net, x, gy, graph=True):
    ctx = graph_policy.graph_step() if graph else contextlib.nullcontext()
    params = list(net.trainable_parameters())
    with ctx:
        y = model(x)
        saved = saved_storages(y)
        grads = torch.autograd.grad(y, [x] + params, gy)
    kept = [t.untyped_storage().data_ptr() in saved for t in model.seen]
    return y, grads, kept


def _reference(model, net, x, gy):
    """The block with every projection's merged weight ``W + (α/r)·U·D`` in float64, by plain autograd."""
    params = list(net.trainable_parameters())
    leaves = [p.detach().double().clone().requires_grad_() for p in params]
    ids = {id(p): i for i, p in enumerate(params)}

    def lin(layer, t):
        (a,) = layer._lyco_host.adapters
        ts = a.tensors()
        up, down = leaves[ids[id(ts["lora_up.weight"])]], leaves[ids[id(ts["lora_down.weight"])]]
        w = layer.weight.detach().double() + (float(ts["alpha"]) / down.shape[0]) * up @ down
        return F.linear(t, w, layer.bias.detach().double())

    def norm(m, t):
        return F.layer_norm(t, m.normalized_shape, None if m.weight is None else m.weight.detach().double(),
                            None if m.bias is None else m.bias.detach().double(), m.eps)
    xr = x.detach().double().clone().requires_grad_()
    n1 = norm(model.norm1, xr)
    a = model.attn
    h = xr + torch.softmax(lin(a.to_q, n1) @ lin(a.to_k, n1).transpose(-1, -2) / 4, -1) @ lin(a.to_v, n1)
    y = lin(model.ff, norm(model.norm2, h))
    return y, torch.autograd.grad(y, [xr] + leaves, gy.double())


@pytest.mark.parametrize("affine", [True, False])
def test_norm_outputs_regenerated_in_graph_steps_match_float64(paths, affine):
    model, net = _setup(affine=affine)
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 24, 48, dtype=torch.float64)
    paths.setenv("LYCO_NORM_REGEN", "0")
    y0, g0, kept0 = _step(model, net, x, gy)
    paths.setenv("LYCO_NORM_REGEN", "1")
    y1, g1, kept1 = _step(model, net, x, gy)
    assert kept0 == [True, True] and kept1 == [False, False]
    assert torch.equal(y0, y1)
    yr, gr = _reference(model, net, x, gy)
    torch.testing.assert_close(y1, yr, rtol=1e-10, atol=1e-10)
    for a, b, r in zip(g0, g1, gr):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)  # float64: the rebuilt x within its rounding
        torch.testing.assert_close(b, r, rtol=1e-9, atol=1e-9)


def test_policy_graph_steps_only_unless_everywhere(paths):
    """Unset: regenerated inside ``graph_step`` only; ``LYCO_INPUT_REGEN=0`` turns it off too; the delta path (LoRA's
    down through ``regen.linear``) takes it where the policy says — inside ``graph_step`` by default, outside it only
    with ``1``, its gradients then within float64 rounding of the kept input's; a typo is an error."""
    model, net = _setup()
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 24, 48, dtype=torch.float64)
    assert _step(model, net, x, gy, graph=False)[2] == [True, True]
    assert _step(model, net, x, gy)[2] == [False, False]
    paths.setenv("LYCO_INPUT_REGEN", "0")
    assert _step(model, net, x, gy)[2] == [True, True]
    paths.delenv("LYCO_INPUT_REGEN")
    paths.setenv("LYCO_BYPASS_OP", "0")
    paths.setenv("LYCO_SHARED_INPUT", "0")
    _, g0, kept = _step(model, net, x, gy, graph=False)
    assert kept == [True, True]
    assert _step(model, net, x, gy)[2] == [False, False]
    paths.setenv("LYCO_NORM_REGEN", "1")
    _, g1, kept = _step(model, net, x, gy, graph=False)
    assert kept == [False, False]
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    paths.setenv("LYCO_BYPASS_OP", "1")
    paths.setenv("LYCO_NORM_REGEN", "on")
    with pytest.raises(ValueError, match="LYCO_NORM_REGEN"):
        _step(model, net, x, gy)


def test_the_size_rule(paths):
    """``LYCO_NORM_REGEN_MIN``: a norm output of fewer elements is kept (unset: 2²¹, above the tiny block's 768); at
    exactly its size regenerated, one more element asked and kept; not an integer: an error naming it."""
    model, net = _setup()
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 24, 48, dtype=torch.float64)
    paths.delenv("LYCO_NORM_REGEN_MIN")
    assert _step(model, net, x, gy)[2] == [True, True]
    paths.setenv("LYCO_NORM_REGEN_MIN", str(x.numel()))
    assert _step(model, net, x, gy)[2] == [False, False]
    paths.setenv("LYCO_NORM_REGEN_MIN", str(x.numel() + 1))
    assert _step(model, net, x, gy)[2] == [True, True]
    paths.setenv("LYCO_NORM_REGEN_MIN", "4M")
    with pytest.raises(ValueError, match="LYCO_NORM_REGEN_MIN"):
        _step(model, net, x, gy)


def test_what_a_norm_regen_refuses(paths):
    """A norm over more than the last dimension, a norm's output modified in place, an autocast-cast input (the op's
    own tensor: x is not the norm's output)."""
    paths.setenv("LYCO_NORM_REGEN", "1")
    u = torch.randn(3, 4, 6, requires_grad=True)
    assert regen.find(F.layer_norm(u, (6,)), norm=True)[0].kind == "layernorm"
    assert regen.find(F.layer_norm(u, (6,))) is None  # the caller did not ask for norms
    assert regen.find(F.layer_norm(u, (4, 6)), norm=True) is None
    z = F.layer_norm(u, (6,))
    z.mul_(2)
    assert regen.find(z, norm=True) is None
    found = regen.find(F.layer_norm(u, (6,)).reshape(-1, 6), norm=True)  # a layer host's 2-D rows
    assert found is not None and found[0].shape == (12, 6)


def test_bf16_within_one_rounding_of_x(paths):
    """bf16 on the CPU, whose layer norm keeps its mean and 1/σ in bf16: the rebuilt x differs from the kept one by
    a rounding of x in places; every gradient within bf16's tolerance of the kept input's."""
    model, net = _setup(torch.bfloat16)
    x = torch.randn(2, 24, 16, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(2, 24, 48, dtype=torch.bfloat16)
    paths.setenv("LYCO_NORM_REGEN", "0")
    _, g0, _ = _step(model, net, x, gy)
    paths.setenv("LYCO_NORM_REGEN", "1")
    _, g1, kept = _step(model, net, x, gy)
    assert kept == [False, False]
    for a, b in zip(g0, g1):
        assert ((a.double() - b.double()).abs().max() / a.double().abs().max()).item() < 2e-2


@pytest.mark.parametrize("permuted", [False, True])
def test_the_kernel_reads_the_norms_input(paths, triton_interpreter, permuted):
    """``LYCO_REGEN_KERNEL``: the shared op's ∂D (rank 3 × 3) and the bypass op's from the norm's input and stats by
    ``regen_triton.weight_grad`` (interpreted, its CUDA condition forced), fp32: the gradients within fp32 sums of
    the kept input's; norm1's input also as SD1.5's gets it (channels-first, permuted: no 2-D view)."""
    paths.setenv("LYCO_REGEN_KERNEL", "1")
    paths.setattr(regen_triton, "usable", lambda ops, r: True)
    calls, real = [], regen_triton.weight_grad
    paths.setattr(regen_triton, "weight_grad", lambda *a: calls.append((a[1].kind, a[0].shape[1])) or real(*a))
    model, net = _setup(torch.float32)
    x = torch.randn(2, 40, 16, requires_grad=True)
    if permuted:
        x = torch.randn(2, 16, 40).transpose(1, 2).requires_grad_()
    gy = torch.randn(2, 40, 48)
    paths.setenv("LYCO_NORM_REGEN", "0")
    _, g0, _ = _step(model, net, x, gy)
    assert calls == []
    paths.setenv("LYCO_NORM_REGEN", "1")
    _, g1, kept = _step(model, net, x, gy)
    assert kept == [False, False] and sorted(calls) == [("layernorm", 3), ("layernorm", 9)]
    # x rebuilt from the norm's input and stats in fp32 (not read as the norm rounded it), its products summed in
    # another order: ∂D within a few fp32 roundings of x's sums (2.5e-6 against values ≈ 0.1 on one element with
    # Triton 3.9's interpreter and NumPy 2.4)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_the_tiny_sdxl_regenerates_every_norm_output_it_adapts(paths):
    """The real model code (diffusers' BasicTransformerBlock, CLIP's encoder layers), in a graph step with the bypass
    op: every layer norm whose output an adapted layer reads (UNet norm1–3, CLIP layer_norm1–2; all but the text
    encoders' first, over frozen embeddings) goes to those layers as its makings; the gradients equal the kept
    outputs' within float64 rounding."""
    comps, params, g = tiny_sdxl_lora()
    norms = {f"{c}.{n}": m for c, comp in comps.items() for n, m in comp.named_modules()
             if isinstance(m, nn.LayerNorm) and n.rsplit(".", 1)[-1] in ("norm1", "norm2", "norm3", "layer_norm1",
                                                                         "layer_norm2")}
    assert len(norms) >= 12
    outs = {}
    for n, m in norms.items():
        # a norm whose input needs no gradient (a text encoder's first layer, over frozen embeddings) keeps nothing:
        # its output has no producer to rebuild it from
        def hook(mod, args, out, n=n):
            if out.grad_fn is not None:
                outs[n] = id(out)
        m.register_forward_hook(hook)
    hits = record_regen_hits(paths, "layernorm")
    ids, inputs = tiny_sdxl_step_inputs(comps, g)

    def grads():
        outs.clear()
        hits.clear()
        with graph_policy.graph_step():
            return torch.autograd.grad(tiny_sdxl_loss(comps, ids, inputs), params, allow_unused=True)

    paths.setenv("LYCO_NORM_REGEN", "0")
    g0 = grads()
    assert not hits
    paths.setenv("LYCO_NORM_REGEN", "1")
    g1 = grads()
    assert len(outs) >= len(norms) - 2 and set(outs.values()) <= hits, sorted(
        n for n, i in outs.items() if i not in hits)
    for a, b in zip(g0, g1):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-11, atol=1e-13)


def test_a_concatenating_forward_keeps_neither_x_nor_the_concatenation(paths):
    """A layer wide out that concatenates ``[x | h]`` in its forward (``lowrank._cat_forward_pays``: the GEGLU
    projection's form, in + r a multiple of 8) with its input a norm's output: the op keeps the norm's makings and a
    copy of h's r columns — no saved tensor holds the ``rows × (in + r)`` concatenation — and its gradients are the
    kept input's."""
    cats = []
    real = lowrank._cat_forward_pays
    paths.setattr(lowrank, "_cat_forward_pays", lambda *a: cats.append(real(*a)) or cats[-1])
    torch.manual_seed(1)
    model = nn.Sequential(nn.LayerNorm(13), nn.Linear(13, 64)).double()
    net = lyco.create(model, preset="full", algo="lora", rank=3, alpha=2.0, seed=1)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    params = list(net.trainable_parameters())
    x = torch.randn(4, 12, 13, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(4, 12, 64, dtype=torch.float64)
    out = []
    for flag in ("0", "1"):
        paths.setenv("LYCO_NORM_REGEN", flag)
        cats.clear()
        with graph_policy.graph_step():
            y = model(x)
            node = y.grad_fn
            while node.name() != "_BypassOpBackward":
                node = node.next_functions[0][0]
            sizes = [t.untyped_storage().nbytes() for t in node.saved_tensors if t is not None]
            out.append(torch.autograd.grad(y, [x] + params, gy))
        assert cats == [True]
        cat_bytes = 48 * 16 * 8  # rows × (in + r), float64
        assert (cat_bytes in sizes) == (flag == "0")  # kept: [x | h] itself (x and h are views of it)
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)

"""``casts.step_casts``: within one training step the low-rank ops cast an fp32 adapter's factors to the compute
dtype once per storage (a FlatAdamW group's flat buffer), not per layer and direction — the same values, far fewer
cast kernels; and the ops keep the factors they cast in forward for their backward."""

import contextlib

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import lyco
from lyco.algorithms import casts, lowrank
from lyco.optim import FlatAdamW
from sink_helpers import AutogradAdds


class _Casts(TorchDispatchMode):
    """Records the element count of every fp32 → bf16 copy dispatched."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32
                and out.dtype == torch.bfloat16):
            self.sizes.append(args[0].numel())
        return out


def _mixed_model(conv: bool, **algo):
    """Three adapted layers, the base in bf16, the adapter (LoRA unless ``algo`` says otherwise) in fp32
    (``lyco train``'s mixed precision), its parameters made views of one flat buffer by FlatAdamW."""
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1))
    else:
        model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    net = lyco.create(model, preset="full", **({"algo": "lora", "rank": 4, "alpha": 2.0, "seed": 1} | algo))
    model.to(torch.bfloat16)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.data = (p.data.float() + 0.1 * torch.randn(p.shape))
    params = list(net.trainable_parameters())
    FlatAdamW(params, lr=1e-3)
    return model, params


def _step(model, params, x, gy, cached: bool):
    """Forward and backward under CPU autocast (bf16), inside ``step_casts`` or not: (y, ∂x and ∂θ, cast sizes)."""
    for p in params:
        p.grad = None
    xr = x.detach().clone().requires_grad_()
    rec = _Casts()
    ctx = casts.step_casts() if cached else contextlib.nullcontext()
    with rec, ctx, torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(xr)
        y.backward(gy)
    return y.detach(), [xr.grad] + [p.grad.clone() for p in params], rec.sizes


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_one_cast_per_storage_and_the_same_numbers(monkeypatch, conv):
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    model, params = _mixed_model(conv)
    x = (torch.randn(2, 8, 6, 6) if conv else torch.randn(40, 32)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gy = torch.randn_like(model(x).float()).bfloat16()
    y0, g0, casts0 = _step(model, params, x, gy, cached=False)
    y1, g1, casts1 = _step(model, params, x, gy, cached=True)
    flat = params[0].untyped_storage().nbytes() // 4
    assert sum(p.numel() for p in params) == flat  # the FlatAdamW buffer holds exactly the adapter
    # per layer one cast of each factor in forward, none again in backward (the op keeps what it cast) …
    assert sorted(casts0) == sorted(p.numel() for p in params)
    # … and within step_casts one cast of the whole buffer for all of them
    assert casts1 == [flat]
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert [g.dtype for g in g1[1:]] == [torch.float32] * len(params)


def test_a_freed_factor_does_not_pass_its_cast_on():
    """Factors built inside a step (LoHa's products) are cast by their own storage: while the cast is kept the
    storage is kept too, so a new tensor cannot be given its address and be mistaken for it."""
    with casts.step_casts():
        for i in range(50):
            t = torch.randn(256) * (i + 1)
            c = casts.cast_factor(t, torch.bfloat16)
            assert torch.equal(c, t.to(torch.bfloat16)), i
            del t, c


def test_outside_the_block_nothing_is_kept():
    t = torch.randn(16)
    assert casts._CASTS[0] is None
    c = casts.cast_factor(t, torch.bfloat16)
    assert torch.equal(c, t.to(torch.bfloat16)) and casts._CASTS[0] is None
    with casts.step_casts():
        casts.cast_factor(t, torch.bfloat16)
        with casts.step_casts():  # nested: its own casts
            assert casts._CASTS[0] == {}
        assert len(casts._CASTS[0]) == 1
    assert casts._CASTS[0] is None


def test_a_factor_inside_a_large_storage_is_cast_alone(monkeypatch):
    monkeypatch.setattr(casts, "CAST_WHOLE_MAX", 64)
    big = torch.randn(1000)
    a, b = big[10:20].view(2, 5), big[500:512].view(3, 4)
    rec = _Casts()
    with rec, casts.step_casts():
        ca, cb = casts.cast_factor(a, torch.bfloat16), casts.cast_factor(b, torch.bfloat16)
        assert casts.cast_factor(a, torch.bfloat16) is ca  # once per step
    assert rec.sizes == [10, 12]
    assert torch.equal(ca, a.to(torch.bfloat16)) and torch.equal(cb, b.to(torch.bfloat16))


class _SharedInput(nn.Module):
    """A norm whose output three adapted layers read (q, k and v of an attention block)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        h = self.norm(x)
        return self.q(h) + self.k(h) * self.v(h)


def test_one_cast_of_an_input_three_layers_share(monkeypatch):
    """Under autocast the norm's output is fp32 and each op casts it to bf16: within step_casts the three ops share
    one cast (the same values: outputs and gradients equal)."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    torch.manual_seed(0)
    model = _SharedInput()
    net = lyco.create(model, preset="full", algo="lora", rank=4, alpha=2.0, seed=1)
    model.to(torch.bfloat16)
    model.norm.float()  # CUDA's autocast runs norms in fp32; the CPU's does not: an fp32 norm on an fp32 input
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.data = p.data.float() + 0.1 * torch.randn(p.shape)
    params = list(net.trainable_parameters())
    x = torch.randn(40, 32)
    gy = torch.randn(40, 32).bfloat16()
    y0, g0, casts0 = _step(model, params, x, gy, cached=False)
    y1, g1, casts1 = _step(model, params, x, gy, cached=True)
    assert casts0.count(x.numel()) == 3
    assert casts1.count(x.numel()) == 1
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


def test_a_changed_input_is_cast_again():
    """The entry is keyed by the input's version: an in-place change between two ops is not missed."""
    x = torch.randn(8, 4)
    with casts.step_casts():
        a = casts.cast_input(x, torch.bfloat16)
        assert casts.cast_input(x, torch.bfloat16) is a
        x.mul_(2)
        b = casts.cast_input(x, torch.bfloat16)
        assert b is not a and torch.equal(b, x.to(torch.bfloat16))
        y = x.view(4, 8)  # same memory, another layout: its own cast
        c = casts.cast_input(y, torch.bfloat16)
        assert c.shape == (4, 8) and torch.equal(c, y.to(torch.bfloat16))


class _Adds(TorchDispatchMode):
    """Counts in-place adds (autograd's accumulation into an existing ``.grad``) and in-place addmm's."""

    def __init__(self):
        super().__init__()
        self.add_ = self.addmm_ = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.add_.Tensor:
            self.add_ += 1
        if func in (torch.ops.aten.addmm_.default, torch.ops.aten.addmm.out):
            self.addmm_ += 1
        return func(*args, **(kwargs or {}))


def _fp32_lora(hook=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    net = lyco.create(model, preset="full", algo="lora", rank=4, alpha=2.0, seed=1)
    params = list(net.trainable_parameters())
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape))
    if hook is not None:
        params[0].register_hook(hook)
    return model, params


def _accumulate(model, params, xs, sink: bool, persistent: bool = True):
    """Two micro-batches' backward into gradients that exist before the first (as the trainer's captured steps keep
    them) or not; returns the gradients and the op counts."""
    for p in params:
        p.grad = torch.zeros_like(p) if persistent else None
    rec = _Adds()
    with rec, casts.step_casts(grad_sink=sink):
        for x in xs:
            model(x).square().mean().backward()
    return [p.grad.clone() for p in params], rec


def test_grad_sink_adds_into_the_gradients(monkeypatch):
    """With the sink the linear layers' factor gradients are added into ``.grad`` by their GEMMs: autograd's
    per-parameter adds are gone and the accumulated gradients are autograd's (fp32 rounding)."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    model, params = _fp32_lora()
    xs = [torch.randn(40, 32), torch.randn(40, 32)]
    ref, rec0 = _accumulate(model, params, xs, sink=False)
    got, rec1 = _accumulate(model, params, xs, sink=True)
    assert rec0.add_ - rec1.add_ == 2 * len(params)   # one add per parameter and micro-batch, gone
    assert rec1.addmm_ - rec0.addmm_ == 2 * len(params)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # no gradient yet (the first micro-batch of an eager step): autograd takes the first one (no add), the second
    # micro-batch adds into it by the GEMM
    first, rec2 = _accumulate(model, params, xs, sink=True, persistent=False)
    for a, b in zip(ref, first):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert rec2.add_ == 0 and rec2.addmm_ - rec0.addmm_ == len(params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_sink_adds_conv_gradients_itself(monkeypatch, dtype):
    """A conv's factor gradients (no GEMM adds into ``.grad`` there: batch-summed) are added into ``.grad`` by the op
    after its products (``lowrank._sink_add``), not by autograd's accumulation: over two micro-batches into kept
    gradients, every add is the op's, and the gradients are autograd's bit for bit (the same cast, then the same add)."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)).to(dtype)
    net = lyco.create(model, preset="full", algo="locon", rank=4, alpha=2.0, seed=1)
    params = list(net.trainable_parameters())
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(dtype) + 0.1 * torch.randn(p.shape, dtype=dtype)
    assert len(params) == 6 and all(p.dim() == 4 for p in params)
    xs = [torch.randn(2, 8, 6, 6, dtype=dtype), torch.randn(2, 8, 6, 6, dtype=dtype)]
    ref, _ = _accumulate(model, params, xs, sink=False)
    for p in params:
        p.grad = torch.zeros_like(p)
    rec = AutogradAdds(monkeypatch)
    with rec, casts.step_casts(grad_sink=True):
        for x in xs:
            model(x).square().mean().backward()  # _accumulate's loss
    assert rec.outside == 0 and rec.inside == 2 * len(params)
    for a, p in zip(ref, params):
        assert p.grad.abs().sum() > 0 and torch.equal(p.grad, a)


def test_grad_sink_leaves_hooked_parameters_to_autograd(monkeypatch):
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    seen = []
    model, params = _fp32_lora(hook=lambda g: seen.append(g.clone()))
    xs = [torch.randn(40, 32)]
    ref, _ = _accumulate(*_fp32_lora(), xs, sink=False)
    got, _ = _accumulate(model, params, xs, sink=True)
    assert len(seen) == 1 and torch.equal(seen[0], got[0])   # the hooked factor went through autograd
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_grad_sink_needs_a_gemm_that_adds_into_the_gradients_dtype(monkeypatch):
    """bf16 products into fp32 gradients need torch's ``addmm(out_dtype=)`` (CUDA); where it is missing (the CPU)
    the gradients go back to autograd as before."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    model, params = _mixed_model(conv=False)
    x = torch.randn(40, 32).bfloat16()
    for p in params:
        p.grad = torch.zeros_like(p)
    rec = _Adds()
    with rec, casts.step_casts(grad_sink=True):
        model(x).float().square().mean().backward()
    assert lowrank._OUT_DTYPE[("cpu", torch.bfloat16, torch.float32)][2] is False
    assert rec.add_ == len(params) and all(p.grad.abs().sum() > 0 for p in params)


def test_grad_sink_only_where_the_backward_accumulates(monkeypatch):
    """``torch.autograd.grad`` returns the parameters' gradients and ``.backward(inputs=…)`` leaves the others alone:
    in a sink block neither may add into ``.grad``."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    model, params = _fp32_lora()
    x = torch.randn(40, 32)
    ref = torch.autograd.grad(model(x).square().mean(), params)
    with torch.no_grad():
        for p in params:
            p.grad = torch.zeros_like(p)
    with casts.step_casts(grad_sink=True):
        got = torch.autograd.grad(model(x).square().mean(), params)
        xr = x.clone().requires_grad_()
        model(xr).square().mean().backward(inputs=[xr])
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)
    assert xr.grad is not None
    for g, r in zip(got, ref):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("algo", [dict(algo="lora", dora=True), dict(algo="glora")], ids=["dora", "glora"])
def test_rebuilt_ops_cast_once_per_storage(algo):
    """DoRA's and GLoRA's builds inside the rebuilt op (forward and backward) take their fp32 factors from the
    storage's one cast (``casts.cast_factor``): one cast kernel for all layers, the same outputs and gradients."""
    model, params = _mixed_model(False, **algo)
    x = torch.randn(40, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gy = torch.randn_like(model(x).float()).bfloat16()
    y0, g0, casts0 = _step(model, params, x, gy, cached=False)
    y1, g1, casts1 = _step(model, params, x, gy, cached=True)
    flat = params[0].untyped_storage().nbytes() // 4
    assert sum(p.numel() for p in params) == flat
    factors = sum(p.numel() for p in params if p.dim() == 2)   # the 2-D factors (DoRA's magnitude is a vector)
    assert sum(casts0) >= factors and casts1 == [flat]
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("strategy, cached, sink", [("single", True, True), ("flat", True, True),
                                                    ("ddp", True, False), ("fsdp", False, False)])
def test_the_trainer_sinks_only_where_nothing_else_reads_the_accumulation(strategy, cached, sink):
    """DDP fills its buckets from per-parameter hooks on autograd's accumulation, which the sink would skip; FSDP
    frees a unit's storage between its forward and its backward, so an address would not name the same factors."""
    from types import SimpleNamespace

    from lyco.train.loop import Trainer
    with Trainer._step_casts(SimpleNamespace(strategy=strategy)):
        assert (casts._CASTS[0] is not None) == cached
        assert casts.sink_on() == sink
    assert casts._CASTS[0] is None and not casts.sink_on()


def test_a_cast_autograd_records_stays_differentiable():
    """Where autograd records (a build's own autograd form, a nested pass through it) the cast is the plain
    differentiable one: the gradient reaches the fp32 parameter; inside a Function's body (no grad) the cached view."""
    p = nn.Parameter(torch.randn(4, 3))
    with casts.step_casts():
        c = casts.cast_factor(p, torch.bfloat16)
        assert c.requires_grad and c.grad_fn is not None
        (c.float() * 2).sum().backward()
        with torch.no_grad():
            v = casts.cast_factor(p, torch.bfloat16)
            assert not v.requires_grad and casts.cast_factor(p, torch.bfloat16).data_ptr() == v.data_ptr()
    torch.testing.assert_close(p.grad, torch.full_like(p, 2.0))

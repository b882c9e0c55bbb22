"""Where a linear layer's merged weight pays (``lowrank._merged_pays``, ``LYCO_MERGED_ROWS``): the forward through
``W + s·U·D`` and ∂x through it only where the rows pay for its build; elsewhere the forward adds the rank-r product to
the frozen GEMM's output and ∂x is ``∂y·W + s·∂h·D`` (the ``split`` backward of the bypass op and of the q/k/v group).
Every gradient against dense float64 autograd, and which path ran, counted."""

import pytest
import torch

import lyco
from lyco.algorithms import lowrank, lowrank_shared

from test_forward_merged import _Block, _switch  # noqa: F401 — the same two blocks and switch


def test_rule_and_its_errors(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("LYCO_MERGED_ROWS", raising=False)
    assert lowrank._merged_pays(x, 1, 10**6)  # no side stream (the CPU): always, as before the rule
    monkeypatch.setenv("LYCO_MERGED_ROWS", "1")
    assert lowrank._merged_pays(x, 256, 256) and not lowrank._merged_pays(x, 255, 256)
    monkeypatch.setenv("LYCO_MERGED_ROWS", "0.25")
    assert lowrank._merged_pays(x, 64, 256) and not lowrank._merged_pays(x, 63, 256)
    monkeypatch.setenv("LYCO_MERGED_ROWS", "inf")
    assert not lowrank._merged_pays(x, 10**9, 1)
    for bad in ("-1", "nan", "-inf", "many"):
        monkeypatch.setenv("LYCO_MERGED_ROWS", bad)
        with pytest.raises(ValueError, match="LYCO_MERGED_ROWS"):
            lowrank._merged_pays(x, 1, 1)


def test_default_where_the_side_streams_run(monkeypatch):
    """Unset, where the op's products run on the side streams (a stand-in stream here): c = 0.75 (run 312) — SDXL b1's
    1280-channel level (1024 rows, 1280 inputs) through W′, its ff.net.2 (5120 inputs) and a q/k/v group's ∂x (3840
    outputs) not; SD1.5 b1's 1280-channel level (256 rows) not, its 640-channel one (1024 rows, 640 inputs) yes."""
    x = torch.zeros(1)
    monkeypatch.delenv("LYCO_MERGED_ROWS", raising=False)
    monkeypatch.setattr(lowrank, "side_stream", lambda t: object())
    assert lowrank._merged_pays(x, 1024, 1280) and lowrank._merged_pays(x, 1024, 640)
    assert lowrank._merged_pays(x, 960, 1280) and not lowrank._merged_pays(x, 959, 1280)
    assert not lowrank._merged_pays(x, 1024, 5120) and not lowrank._merged_pays(x, 1024, 3840)
    assert not lowrank._merged_pays(x, 256, 1280)


def _setup(monkeypatch, rows: str, merged_fwd: bool):
    """``LYCO_MERGED_ROWS=rows``, the op on every layer (``LYCO_BYPASS_ROWS=0``: fc1's 24 rows < 32 outputs included),
    :func:`_switch`; two :class:`_Block` with LoRA (rank 4, alpha 2: s = 0.5) whose factors are all nonzero; and the
    generator the inputs come from."""
    monkeypatch.setenv("LYCO_MERGED_ROWS", rows)
    monkeypatch.setenv("LYCO_BYPASS_ROWS", "0")
    _switch(monkeypatch, merged_fwd)
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block(), _Block())
    net = lyco.create(model, preset="full", algo="lora", rank=4, alpha=2, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model, net, g


def _count_builds(monkeypatch):
    """Every merged weight the ops build (``lowrank._merged``, which the bypass op's and the group's builds call on
    the CPU), counted."""
    calls = []
    real = lowrank._merged

    def counted(*a, **k):
        calls.append(tuple(a[0].shape))
        return real(*a, **k)

    monkeypatch.setattr(lowrank, "_merged", counted)
    monkeypatch.setattr(lowrank_shared, "_merged", counted)
    return calls


def _dense_step(model, net, x, s=0.5):
    """The two blocks' output and the gradients of ``Σ y²`` for x and every adapter factor, by float64 autograd on
    each layer's ``W + s·U·D`` (the adapter's parameters as they are now)."""
    ps = {n: p.detach().double().clone().requires_grad_(True) for n, p in net.named_parameters()}
    t0 = x.detach().double().clone().requires_grad_(True)

    def lin(name, m, t):
        pre = f"layers.{name}.params."
        w = m.weight.double() + s * ps[pre + "lora_up__weight"] @ ps[pre + "lora_down__weight"]
        return t @ w.t() + m.bias.double()

    t = t0
    for bi, blk in enumerate(model):
        nm = lambda n: f"model__{bi}__{n}"  # noqa: E731
        q, k, v = lin(nm("to_q"), blk.to_q, t), lin(nm("to_k"), blk.to_k, t), lin(nm("to_v"), blk.to_v, t)
        t = t + lin(nm("to_out"), blk.to_out, torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v)
        t = t + lin(nm("fc2"), blk.fc2, torch.tanh(lin(nm("fc1"), blk.fc1, t)))
    t.square().sum().backward()
    return t.detach(), t0.grad, {n: p.grad for n, p in ps.items()}


@pytest.mark.parametrize("merged_fwd", [True, False])
@pytest.mark.parametrize("rows", ["1e9", "1", "0"])
def test_steps_against_float64_autograd(monkeypatch, rows, merged_fwd):
    """Three SGD steps of two attention-and-MLP blocks (24 rows: the group's 48 summed outputs, the MLP's 32 hidden
    channels) with every layer split (``1e9``), a mix (``1``: the group's ∂x and the MLP's first layer split, the
    forward of its second — 32 inputs — too) or none (``0``), with the forward through merged weights or not: each
    step's output, ∂x and every factor's gradient against float64 autograd on the merged weights; the merged weights
    built as many times as the rule says, the group's downs stacked once per step."""
    model, net, g = _setup(monkeypatch, rows, merged_fwd)
    builds = _count_builds(monkeypatch)
    cats, real_cat = [], torch.cat

    def cat(ts, *a, **k):  # the group's three downs (rank 4 × 16 inputs) stacked
        if isinstance(ts, (list, tuple)) and len(ts) == 3 and all(tuple(t.shape) == (4, 16) for t in ts):
            cats.append(step)
        return real_cat(ts, *a, **k)

    monkeypatch.setattr(torch, "cat", cat)
    x = torch.randn(2, 12, 16, generator=g)
    for step in range(3):
        want_y, want_gx, want_g = _dense_step(model, net, x)
        builds.clear()
        cats.clear()
        xr = x.clone().requires_grad_(True)
        y = model(xr)
        y.square().sum().backward()
        torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5, msg=f"step {step} y")
        torch.testing.assert_close(xr.grad.double(), want_gx, rtol=1e-5, atol=1e-4, msg=f"step {step} dx")
        for n, p in net.named_parameters():
            torch.testing.assert_close(p.grad.double(), want_g[n], rtol=1e-5, atol=1e-4, msg=f"step {step} {n}")
        # per block: the group (3 members), to_out, fc1, fc2 — backward (∂x) builds, then forward ones
        bwd = {"1e9": 0, "1": 2 * 2, "0": 2 * 6}[rows]  # "1": to_out (16 outputs) and fc2 (16)
        fwd = 0 if not merged_fwd else {"1e9": 0, "1": 2 * 5, "0": 2 * 6}[rows]  # "1": all but fc2 (32 inputs)
        assert len(builds) == bwd + fwd, (step, builds)
        # once per group and step, by its forward: the split ∂x ("1e9", "1") reads the forward's stack
        assert len(cats) == 2, (step, cats)
        with torch.no_grad():
            for p in net.trainable_parameters():
                p.sub_(1e-4 * p.grad)
                p.grad = None


@pytest.mark.parametrize("rows", ["1e9", "0"])
def test_bf16_split_within_bf16_of_float64(monkeypatch, rows):
    """The model and adapter in bf16 (the benchmark's dtype): every gradient of a step with every layer split
    (``1e9``) within bf16's rounding of float64 autograd — the same bound the merged path (``0``) meets."""
    model, net, g = _setup(monkeypatch, rows, False)
    model.to(torch.bfloat16)
    x = torch.randn(2, 12, 16, generator=g).to(torch.bfloat16)
    want_y, want_gx, want_g = _dense_step(model, net, x)
    xr = x.clone().requires_grad_(True)
    y = model(xr)
    y.float().square().sum().backward()

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel(y, want_y) < 2e-2 and rel(xr.grad, want_gx) < 3e-2
    for n, p in net.named_parameters():
        assert rel(p.grad, want_g[n]) < 3e-2, n

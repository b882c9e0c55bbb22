"""A GEGLU's backward run by the bypass op of the layer after it (``LYCO_GEGLU_FUSE``, ``regen.find_geglu``,
``lowrank._geglu_input``; benchmarks/NOTES.md change 120): the op takes the projection's output ``p = [a | g]`` as its
input in place of ``x = a ⊙ gelu(g)``, and its backward gives ∂p — by one Triton kernel
(``regen_triton.geglu_backward``, run here in Triton's interpreter) that also forms ``∂D = s·∂hᵀ·x``, or by torch's
own ops where the kernel cannot run. Checked against float64 math written here and against the unfused step's
gradients; the mul's, GELU's and the split's nodes no longer reached, gelu(g) no longer kept, and every condition
under which the op keeps its ordinary input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from regen_helpers import adapted, saved_storages
from test_input_regen import GEGLUFeedForward, _reference, _setup, _step
from lyco.algorithms import lowrank, regen, regen_triton


@pytest.fixture(scope="module")
def kern(triton_interpreter):
    assert regen_triton._UPCAST, "Triton was imported before tests/conftest.py set TRITON_INTERPRET"
    yield regen_triton


@pytest.fixture
def fused(monkeypatch):
    """The bypass op on every layer, the fusion asked for everywhere, the kernel's CUDA condition forced (it runs in
    the interpreter); ``monkeypatch.kernel_calls`` counts the kernel's launches."""
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.delenv("LYCO_BYPASS_OP_KINDS", raising=False)
    monkeypatch.setattr(lowrank, "bypass_pays", lambda spec, x, grouped=False: True)
    monkeypatch.setenv("LYCO_INPUT_REGEN", "1")
    monkeypatch.setenv("LYCO_GEGLU_FUSE", "1")
    monkeypatch.setattr(regen_triton, "geglu_usable", lambda p, r: True)
    calls, real = [], regen_triton.geglu_backward
    monkeypatch.setattr(regen_triton, "geglu_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.kernel_calls = calls
    return monkeypatch


def _gelu64(g):
    return 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))


def _dgelu64(g):
    return 0.5 * (1 + torch.erf(g / math.sqrt(2))) + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)


def _float64(gx, p, gh, s):
    """∂p and ∂D in float64 from the same (rounded) inputs: the exact derivative of ``a ⊙ gelu(g)``."""
    a, g = p.double().chunk(2, -1)
    gxd = gx.double()
    gp = torch.cat([gxd * _gelu64(g), gxd * a * _dgelu64(g)], -1)
    return gp, s * gh.double().t() @ (a * _gelu64(g))


def _rel(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def _inputs(n, k, r, dtype, seed, strided):
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(n, 2 * k, generator=g) * 2).to(dtype)
    if strided:  # ∂x as the wide layers' [∂x | ∂h] GEMM leaves it, ∂h a column slice
        gx = torch.randn(n, k + 8, generator=g).to(dtype)[:, 8:]
        gh = torch.randn(n, r + 5, generator=g).to(dtype)[:, 5:]
    else:
        gx = torch.randn(n, k, generator=g).to(dtype)
        gh = torch.randn(n, r, generator=g).to(dtype)
    return gx, p, gh


# relative to the largest entry. fp32: the sums' order and fp32 rounding of erf/exp. bf16/fp16 against the exact
# derivative: the roundings torch makes between the ops (gelu(g), x, ∂b = ∂x·a: one ulp each, 2⁻⁸ bf16) — and the
# interpreter rounds fp32 → bf16 by truncation (up to one ulp more each)
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("n,k,r", [(64, 64, 16), (300, 70, 16), (77, 33, 5), (130, 40, 64), (3, 150, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strided", [False, True])
def test_kernel_matches_float64(kern, n, k, r, dtype, strided):
    """∂p and ∂D over partial row and column blocks, ranks below, at and above the tensor cores' 16 up to 64,
    strided ∂x and ∂h; ∂D written in a new tensor (its dtype as asked) and added into an fp32 gradient."""
    gx, p, gh = _inputs(n, k, r, dtype, n + k + r, strided)
    ref_p, ref_d = _float64(gx, p, gh, 0.375)
    gp, gd = kern.geglu_backward(gx, p, gh, 0.375, torch.float32)
    assert gp.dtype == dtype and gp.shape == (n, 2 * k) and gp.is_contiguous()
    assert gd.dtype == torch.float32 and gd.shape == (r, k)
    assert _rel(gp, ref_p) < TOL[dtype]
    assert _rel(gd, ref_d) < TOL[dtype]
    base = torch.randn(r, k, generator=torch.Generator().manual_seed(1))
    into = base.clone()
    gp2, none = kern.geglu_backward(gx, p, gh, 0.375, into=into)
    assert none is None and torch.equal(gp2, gp)
    assert _rel(into, ref_d + base.double()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_without_a_consumer_gradient(kern, dtype):
    """``gh`` None (a frozen layer after the GEGLU): ∂p alone, the same bits as with ∂D."""
    gx, p, gh = _inputs(150, 70, 16, dtype, 2, True)
    gp, none = kern.geglu_backward(gx, p, None)
    assert none is None and torch.equal(gp, kern.geglu_backward(gx, p, gh, 1.0)[0])
    assert _rel(gp, _float64(gx, p, gh, 1.0)[0]) < TOL[dtype]


def test_kernel_matches_torchs_chain_in_fp32(kern):
    """Against torch's own ops on the same fp32 inputs (``geglu_torch``: what autograd's three nodes compute) — the
    kernel's per-element formula is torch's; only erf/exp's last bits may differ."""
    gx, p, gh = _inputs(200, 96, 16, torch.float32, 3, True)
    ref_p, x = kern.geglu_torch(gx, p)
    gp, gd = kern.geglu_backward(gx, p, gh, 1.0, torch.float32)
    assert (gp - ref_p).abs().max().item() <= 1e-6 * ref_p.abs().max().item()
    assert _rel(gd, gh.double().t() @ x.double()) < 1e-6


@pytest.mark.parametrize("programs", [1, 3, 10_000])
def test_row_splits_sum_to_the_same_and_repeat_bitwise(kern, monkeypatch, programs):
    """However many row splits the launch takes, ∂D is the product and ∂p the same; the same call twice gives the
    same bits (no atomics)."""
    monkeypatch.setitem(kern._GEGLU_CFG, "programs", programs)
    gx, p, gh = _inputs(700, 80, 16, torch.float32, 9, False)
    ref_p, ref_d = _float64(gx, p, gh, 1.0)
    gp, gd = kern.geglu_backward(gx, p, gh, 1.0)
    assert _rel(gp, ref_p) < TOL[torch.float32] and _rel(gd, ref_d) < TOL[torch.float32]
    gp2, gd2 = kern.geglu_backward(gx, p, gh, 1.0)
    assert torch.equal(gp, gp2) and torch.equal(gd, gd2)


def test_torch_form_is_autograds_chain_bit_for_bit():
    """``geglu_torch`` — the op's backward where the kernel cannot run — against autograd's backward of the GEGLU
    itself, in bf16 and float64."""
    for dtype in (torch.bfloat16, torch.float64):
        g = torch.Generator().manual_seed(4)
        p = torch.randn(50, 2, 24, generator=g).to(dtype).requires_grad_()
        a, gate = p.chunk(2, -1)
        x = a * F.gelu(gate)
        gx = torch.randn(x.shape, generator=g).to(dtype)
        (want,) = torch.autograd.grad(x, p, gx)
        got, xr = regen_triton.geglu_torch(gx, p.detach())
        assert torch.equal(got, want) and torch.equal(xr, x.detach())


def _ff_step(model, net, x, gy):
    """:func:`test_input_regen._step` plus whether the out layer's op took p (its input edge goes straight to the
    projection's op, not to the mul)."""
    y, grads, node, saved = _step(model, net, x, gy)
    nxt = [f for f, _ in node.next_functions if f is not None]
    return y, grads, saved, any(f.name() == "_BypassOpBackward" for f in nxt)


def _off_on(fused, dtype):
    """The feed-forward's step in ``dtype`` without the fusion, then with it: ``(y, gradients, took p)`` each."""
    model, net = _setup("geglu")
    model.to(dtype)
    x = torch.randn(3, 70, 12, dtype=dtype, requires_grad=True)
    gy = torch.randn(3, 70, 12, dtype=dtype)
    out = []
    for mode in ("0", "1"):
        fused.setenv("LYCO_GEGLU_FUSE", mode)
        y, grads, _, took = _ff_step(model, net, x, gy)
        out.append((y, grads, took))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_op_gives_the_unfused_gradients(fused, dtype):
    """The feed-forward (proj → GEGLU → out, LoRA on both) with the fusion and without: the same output; with the
    kernel every gradient within its sums' order (fp32) or the interpreter's truncating roundings (bf16) of the
    unfused step's; the kernel once per step; the out layer's input edge on the projection's op."""
    (y0, g0, took0), (y1, g1, took1) = _off_on(fused, dtype)
    assert not took0 and took1 and fused.kernel_calls == [1]
    assert torch.equal(y0, y1)
    tol = 1e-6 if dtype == torch.float32 else 3e-2
    for a, b in zip(g0, g1):
        assert _rel(b, a.double()) < tol


@pytest.mark.parametrize("merged_rows", [None, "1e9"])
def test_fused_op_against_float64_math(fused, merged_rows):
    """In float32 with the kernel, every gradient against the merged-weight feed-forward in float64
    (``test_input_regen._reference``); ``1e9``: the out layer's ∂x as ``∂y·W + s·∂h·D`` before the GEGLU's backward
    (``lowrank._merged_pays``)."""
    if merged_rows is not None:
        fused.setenv("LYCO_MERGED_ROWS", merged_rows)
    model, net = _setup("geglu")
    model.float()  # the float32 values, exactly, in the float64 reference
    model.double()
    x = torch.randn(2, 40, 12, dtype=torch.float64)
    gy = torch.randn(2, 40, 12, dtype=torch.float64)
    _, want = _reference(model, net, x, gy, "geglu")
    model.float()
    _, got, _, took = _ff_step(model, net, x.float().requires_grad_(), gy.float())
    assert took
    for a, b in zip(want, got):
        assert _rel(b, a) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_torch_form_gives_the_unfused_gradients_bit_for_bit(fused, dtype):
    """Where the kernel cannot run by backward time (its check says no), the op's torch form: every gradient bit for
    bit the unfused step's."""
    calls = []
    fused.setattr(regen_triton, "geglu_usable", lambda p, r: calls.append(1) or len(calls) == 1)
    (y0, g0, _), (y1, g1, took) = _off_on(fused, dtype)
    assert took and len(calls) == 2 and fused.kernel_calls == []
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def _lokr_off_on(fused, dtype, rows):
    """A wider feed-forward with LoKr (factor 4, rank 2: the out layer's down is ``kron(I, B)``, groups > 1) in
    ``dtype``, without the fusion, then with it: ``(y, gradients, took p)`` each, the groups of every layer asked,
    and the consumer gradient the kernel got per launch (None: ∂p alone)."""
    torch.manual_seed(0)
    model = GEGLUFeedForward(d=32, inner=64).double()
    net = adapted(model, algo="lokr", rank=2, alpha=3.0, factor=4)
    model.to(dtype)
    if rows is not None:
        fused.setenv("LYCO_MERGED_ROWS", rows)
    asked, got_gh = [], []
    real_input, real_kernel = lowrank._geglu_input, regen_triton.geglu_backward
    fused.setattr(lowrank, "_geglu_input", lambda x, spec, w, d, groups, eye, cd: asked.append(groups) or real_input(
        x, spec, w, d, groups, eye, cd))
    fused.setattr(regen_triton, "geglu_backward", lambda gx, p, gh, *a, **k: got_gh.append(gh) or real_kernel(
        gx, p, gh, *a, **k))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 24, 32, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    gy = torch.randn(2, 24, 32, generator=g, dtype=torch.float64).to(dtype)
    out = []
    for mode in ("0", "1"):
        fused.setenv("LYCO_GEGLU_FUSE", mode)
        y, grads, _, took = _ff_step(model, net, x, gy)
        out.append((y, grads, took))
    return out, asked, got_gh


@pytest.mark.parametrize("rows", [None, "1e9", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_down_takes_the_geglu(fused, dtype, rows):
    """LoKr's out layer (a grouped down) takes p too: the kernel gives ∂p alone (no consumer gradient: ∂D is the
    groups' sum, from the kept x), and every gradient equals the unfused step's within the kernel's roundings — with
    ∂x through the merged weight (``LYCO_MERGED_ROWS=0``), as ``∂y·W + s·∂h·kron(I, B)`` (``1e9``) or by the rule."""
    ((y0, g0, took0), (y1, g1, took1)), asked, got_gh = _lokr_off_on(fused, dtype, rows)
    assert 4 in asked and not took0 and took1
    assert len(got_gh) == 1 and got_gh[0] is None
    assert torch.equal(y0, y1)
    tol = 1e-6 if dtype == torch.float32 else 3e-2
    for a, b in zip(g0, g1):
        assert _rel(b, a.double()) < tol


def test_grouped_down_with_the_torch_form(fused):
    """Where the kernel cannot run by backward time, the grouped op's torch form: in float64 the output bit for bit
    and every gradient within float64's rounding of the unfused step's. (Not bit for bit: LoKr's up-side gradients
    differ in the last bits between a first step and a later one even unfused — not from this path.)"""
    calls = []
    fused.setattr(regen_triton, "geglu_usable", lambda p, r: calls.append(1) or len(calls) == 1)
    ((y0, g0, _), (y1, g1, took)), _, got_gh = _lokr_off_on(fused, torch.float64, None)
    assert took and len(calls) == 2 and got_gh == []
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert _rel(b, a) < 1e-13


class _Probe(GEGLUFeedForward):
    """The feed-forward keeping gelu(g) too, to find its storage among the graph's saved tensors."""

    def forward(self, x):
        h = self.proj(x)
        a, g = h.chunk(2, dim=-1)
        b = F.gelu(g)
        z = a * b
        self.seen.append((z, b))
        return self.out(z)


def test_gelu_output_and_x_not_kept(fused):
    """With the fusion the step's graph keeps neither x nor gelu(g) (the mul's node is freed with x); without it,
    gelu(g) is kept (the mul keeps it)."""
    torch.manual_seed(0)
    model = _Probe()
    adapted(model)
    x = torch.randn(2, 30, 12, requires_grad=True)
    for mode, kept in (("0", True), ("1", False)):
        fused.setenv("LYCO_GEGLU_FUSE", mode)
        model.seen.clear()
        y = model(x)
        z, b = model.seen.pop()
        ptr_z, ptr_b = z.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()
        del z, b
        saved = saved_storages(y)
        assert ptr_z not in saved
        assert (ptr_b in saved) == kept


def test_other_consumers_of_x_still_get_their_gradient(fused):
    """x read by a second consumer besides the adapted layer: that gradient goes through torch's nodes, the op's
    through its own backward, and autograd sums both into p's — the unfused gradients."""

    class TwoReaders(GEGLUFeedForward):
        def forward(self, x):
            a, g = self.proj(x).chunk(2, dim=-1)
            z = a * F.gelu(g)
            return self.out(z) + z[..., :12].square()

    torch.manual_seed(1)
    model = TwoReaders()
    net = adapted(model)
    x = torch.randn(2, 30, 12, requires_grad=True)
    gy = torch.randn(2, 30, 12)
    params = [x] + list(net.trainable_parameters())
    out = []
    for mode in ("0", "1"):
        fused.setenv("LYCO_GEGLU_FUSE", mode)
        out.append(torch.autograd.grad(model(x), params, gy))
    assert fused.kernel_calls == [1]
    for a, b in zip(*out):
        assert _rel(b, a.double()) < 1e-6


class _Variant(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.proj, self.out = nn.Linear(12, 32), nn.Linear(16, 12)

    def forward(self, x):
        h = self.proj(x)
        a, g = h.chunk(2, dim=-1)
        if self.how == "swapped":  # gelu on the first half
            z = g * F.gelu(a)
        elif self.how == "tanh":
            z = a * F.gelu(g, approximate="tanh")
        elif self.how == "hook":
            z = a * F.gelu(g)
            z.register_hook(lambda t: t)
        elif self.how == "retain":
            z = a * F.gelu(g)
            z.retain_grad()
        elif self.how == "thirds":  # a third of a wider projection
            a, g, _ = torch.cat([h, h[..., :16]], -1).chunk(3, dim=-1)
            z = a * F.gelu(g)
        else:
            z = a * F.gelu(g)
        return self.out(z)


@pytest.mark.parametrize("how,takes", [("plain", True), ("swapped", False), ("tanh", False), ("hook", False),
                                       ("retain", False), ("thirds", False)])
def test_what_is_not_fused(fused, how, takes):
    """Only ``a ⊙ gelu(g)`` over the two halves of one projection, a first, exact GELU, no hook and no retained
    gradient on x; the policy at 0 and saved-tensor hooks turn it off too. Gradients equal the unfused ones either
    way."""
    torch.manual_seed(2)
    model = _Variant(how)
    net = adapted(model)
    x = torch.randn(2, 20, 12, requires_grad=True)
    gy = torch.randn(2, 20, 12)
    params = [x] + list(net.trainable_parameters())
    hits, real = [], regen.find_geglu
    fused.setattr(regen, "find_geglu", lambda t: hits.append(real(t)) or hits[-1])
    ref = None
    for mode in ("0", "1"):
        fused.setenv("LYCO_GEGLU_FUSE", mode)
        got = torch.autograd.grad(model(x), params, gy)
        ref = ref or got
    assert any(h is not None for h in hits) == takes
    assert len(fused.kernel_calls) == int(takes)
    for a, b in zip(ref, got):
        assert _rel(b, a.double()) < 1e-6
    if takes:
        fused.setenv("LYCO_GEGLU_FUSE", "0")
        hits.clear()
        model(x)
        assert hits == [None, None]
        fused.setenv("LYCO_GEGLU_FUSE", "1")
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            hits.clear()
            model(x)
        assert all(h is None for h in hits)


def test_default_policy_only_in_graph_steps(monkeypatch):
    """``LYCO_GEGLU_FUSE`` unset: captured steps only (``graph_step``); an unknown value names the variable."""
    from lyco.algorithms import graph_policy
    monkeypatch.setenv("LYCO_INPUT_REGEN", "1")
    monkeypatch.delenv("LYCO_GEGLU_FUSE", raising=False)
    torch.manual_seed(0)
    h = torch.randn(4, 32, requires_grad=True)
    a, g = h.chunk(2, -1)
    z = a * F.gelu(g)
    assert regen.find_geglu(z) is None
    with graph_policy.graph_step():
        assert regen.find_geglu(z) is h
    monkeypatch.setenv("LYCO_GEGLU_FUSE", "yes")
    with pytest.raises(ValueError, match="LYCO_GEGLU_FUSE"):
        regen.find_geglu(z)


def test_geglu_usable_conditions(monkeypatch):
    """The kernel needs CUDA bf16/fp16 (never on these CPU tensors), a rank of at most 64 and rows of unit column
    stride; its self-test gates it per device and dtype."""
    p = torch.randn(10, 32, dtype=torch.bfloat16)
    assert not regen_triton.geglu_usable(p, 16)
    monkeypatch.setattr(regen_triton, "enabled", lambda t: True)
    monkeypatch.setattr(regen_triton, "gate", lambda cache, dev, dt, test: True)
    assert regen_triton.geglu_usable(p, 16) and regen_triton.geglu_usable(p, 64)
    assert not regen_triton.geglu_usable(p, 65)
    assert not regen_triton.geglu_usable(p.t(), 16)
    monkeypatch.setattr(regen_triton, "gate", lambda cache, dev, dt, test: False)
    assert not regen_triton.geglu_usable(p, 16)


@pytest.fixture
def ts():
    """``benchmarks/train_step.py`` as a module."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import train_step
    return train_step


def test_benchmarks_floor_geglu_baseline(fused, ts):
    """``benchmarks/train_step.py``'s ``floor-geglu`` (the frozen model with every ``ff.net.2`` taking its GEGLU's
    backward into one kernel pass, no adapter): on the tiny UNet the input's gradient against the plain frozen model's
    (fp32, the kernel interpreted), one kernel call per GEGLU, and the modules restored after."""
    unet = ts.build_unet("sd15", True, torch.device("cpu"), torch.float32)
    inputs, _ = ts.make_inputs(unet, 1, 16, torch.device("cpu"), torch.float32)
    sample = inputs["sample"].requires_grad_()
    (want,) = torch.autograd.grad(unet(**inputs).sample.square().sum(), sample)
    ffs = [m for n, m in unet.named_modules() if n.endswith("ff.net.2")]
    restore = ts.fuse_frozen_geglu(unet)
    try:
        (got,) = torch.autograd.grad(unet(**inputs).sample.square().sum(), sample)
    finally:
        restore()
    assert len(ffs) > 0 and len(fused.kernel_calls) == len(ffs)
    assert all("forward" not in m.__dict__ for m in ffs)
    assert _rel(got, want.double()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("min_in", ["0", "16"])
def test_output_mode_ia3_takes_the_geglu_too(fused, dtype, min_in):
    """Output-mode (IA)³'s output-keeping op on ``out`` (``ia3._KeepOutput``) takes p the same way — after a
    projection on the same op or (``min_in`` 16: its 12 inputs are below the line) on the rebuilt op: the GEGLU's
    backward by the kernel without ∂D (once per step), every gradient within the kernel's roundings of the unfused
    step's (fp32: its erf/exp; bf16: the interpreter's truncation), gelu(g) not kept; and the torch form where the
    kernel stands aside in backward: bit for bit."""
    fused.setenv("LYCO_IA3_KEEP_OUTPUT", "1")
    fused.setenv("LYCO_IA3_KEEP_OUTPUT_MIN_IN", min_in)
    torch.manual_seed(3)
    model = _Probe()
    net = adapted(model, algo="ia3")
    model.to(dtype)
    x = torch.randn(2, 30, 12, dtype=dtype, requires_grad=True)
    gy = torch.randn(2, 30, 12, dtype=dtype)
    params = [x] + list(net.trainable_parameters())

    def step(mode):
        fused.setenv("LYCO_GEGLU_FUSE", mode)
        model.seen.clear()
        y = model(x)
        z, b = model.seen.pop()
        kept_b = b.untyped_storage().data_ptr() in saved_storages(y)
        del z, b
        return y, torch.autograd.grad(y, params, gy), kept_b

    y0, g0, kept0 = step("0")
    y1, g1, kept1 = step("1")
    assert fused.kernel_calls == [1] and kept0 and not kept1 and torch.equal(y0, y1)
    tol = 1e-6 if dtype == torch.float32 else 3e-2
    for a, b in zip(g0, g1):
        assert _rel(b, a.double()) < tol
    fused.setattr(regen_triton, "geglu_usable", lambda p, r: torch.is_grad_enabled())
    _, g2, _ = step("1")
    assert fused.kernel_calls == [1] and all(torch.equal(a, b) for a, b in zip(g0, g2))


@pytest.mark.parametrize("kernel", [False, True])
def test_the_tiny_sdxl_fuses_every_geglu(fused, kernel):
    """The real model code (diffusers' GEGLU and FeedForward) on the tiny SDXL — UNet and both text encoders, LoRA on
    every layer, the bypass op everywhere: every UNet ``ff.net.2`` takes its GEGLU's projection output (the text
    encoders' MLPs are not GEGLUs), and every adapter gradient equals the unfused step's — bit for bit in the torch
    form (the kernel standing aside in backward), within the kernel's fp32 sums with it (float64 model)."""
    from regen_helpers import tiny_sdxl_lora, tiny_sdxl_loss, tiny_sdxl_step_inputs
    comps, params, g = tiny_sdxl_lora()
    ffn = [m for n, m in comps["unet"].named_modules() if n.endswith("ff.net.2")]
    assert len(ffn) >= 4
    if not kernel:
        fused.setattr(regen_triton, "geglu_usable", lambda p, r: torch.is_grad_enabled())
    hits, real = [], regen.find_geglu
    fused.setattr(regen, "find_geglu", lambda t: hits.append(real(t) is not None) or real(t))
    ids, inputs = tiny_sdxl_step_inputs(comps, g)
    out = []
    for mode in ("0", "1"):
        fused.setenv("LYCO_GEGLU_FUSE", mode)
        hits.clear()
        out.append(torch.autograd.grad(tiny_sdxl_loss(comps, ids, inputs), params, allow_unused=True))
    assert sum(hits) == len(ffn)
    assert len(fused.kernel_calls) == (len(ffn) if kernel else 0)
    for a, b in zip(*out):
        if kernel:
            assert (a is None and b is None) or _rel(b, a) < 1e-5
        else:
            assert (a is None and b is None) or torch.equal(a, b)


def test_benchmarks_unknown_baseline_is_an_error(capsys, ts):
    """``train_step.py --baselines`` names what it does not know and what it expects, before building anything."""
    with pytest.raises(SystemExit):
        ts.main(["--smoke", "--baselines", "floor,flor"])
    err = capsys.readouterr().err
    assert "unknown flor" in err and "floor-geglu" in err


@pytest.mark.parametrize("n,k", [(300, 70), (77, 33), (3, 150)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_d", [False, True])
def test_kernel_channel_sums_for_the_projection(kern, n, k, dtype, bias, with_d):
    """With a :class:`ChannelLink` (change 121) the kernel also offers ``Σ_n ∂p·(p − b)`` per column of p over its
    row blocks: their sum against float64 from the ∂p it wrote and the same p and b (exact products, fp32 sums in
    another order), ∂p and ∂D the same bits as without; the producer takes them for that ∂p only."""
    from lyco.algorithms import scale_triton
    gx, p, gh = _inputs(n, k, 16, dtype, n + k, True)
    b = torch.randn(2 * k, generator=torch.Generator().manual_seed(5)).to(dtype) if bias else None
    link = scale_triton.ChannelLink(b)
    gh = gh if with_d else None
    gp, gd = kern.geglu_backward(gx, p, gh, 0.5, torch.float32, chan=link)
    gp0, gd0 = kern.geglu_backward(gx, p, gh, 0.5, torch.float32)
    assert torch.equal(gp, gp0) and (gd is None or torch.equal(gd, gd0))
    assert link.grad is gp and link.part.dtype == torch.float32 and link.part.shape[1] == 2 * k
    ref = (gp.double() * (p.double() - (b.double() if bias else 0))).sum(0)
    assert _rel(link.part.sum(0), ref) < 1e-5
    other = gp.clone()
    part = link.part
    assert link.take(other) is None and link.part is None  # another tensor: nothing, and the link is emptied
    link.offer(part, gp)
    gp.add_(0)  # an in-place change (autograd adding another consumer's gradient into it) bumps the version
    assert link.take(gp) is None
    link.offer(part, gp)
    assert link.take(gp.unsqueeze(0)) is part  # a view of the same tensor, unchanged (the projection's 3-D output)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("other_consumer", [False, True])
@pytest.mark.parametrize("min_in", ["0", "16"])
def test_ia3_projection_takes_its_channel_sums_from_the_geglu_kernel(fused, dtype, other_consumer, min_in):
    """Output-mode (IA)³ on the projection and on ``out`` (``out`` keeping its output; the projection too, or with
    ``min_in`` 16 — its 12 inputs below the line — on the rebuilt op): the out layer's GEGLU kernel hands the
    projection its channel sums (no read of ∂p and p, or no ∂W′ GEMM, in its backward) — its ∂w then against the
    float64 definition ``y = x·(W ⊙ (1 + w))ᵀ + b`` by autograd, as every other gradient; where p has another consumer
    (its gradient is autograd's sum, not the kernel's ∂p) the projection forms ∂w itself — the same float64 values."""
    from lyco.algorithms import scale_triton
    fused.setenv("LYCO_IA3_KEEP_OUTPUT", "1")
    fused.setenv("LYCO_IA3_KEEP_OUTPUT_MIN_IN", min_in)
    fused.setenv("LYCO_IA3_GEGLU_SUMS", "1")
    torch.manual_seed(3)
    model = GEGLUFeedForward()
    net = adapted(model, algo="ia3")
    taken, real_take = [], scale_triton.ChannelLink.take
    fused.setattr(scale_triton.ChannelLink, "take", lambda self, gy: taken.append(real_take(self, gy)) or taken[-1])
    model.to(dtype)
    x = torch.randn(2, 30, 12, dtype=dtype, requires_grad=True)
    gy = torch.randn(2, 30, 12, dtype=dtype)
    gq = torch.randn(2, 30, 32, dtype=dtype)
    if other_consumer:
        h0 = model.proj.forward
        fused.setattr(model.proj, "forward", lambda t: _tap(h0(t)))
    y = model(x)
    loss = (y.double() * gy.double()).sum() + (_TAPPED.pop().double() * gq.double()).sum() if other_consumer else None
    params = [x] + list(net.trainable_parameters())
    got = torch.autograd.grad(loss if other_consumer else y, params, None if other_consumer else gy)
    assert fused.kernel_calls == [1]
    # out's backward first (nothing offered to it), then the projection's
    assert [t is not None for t in taken] == ([False, False] if other_consumer else [False, True])
    # float64: the definition, w a leaf per layer
    layers = {n.split("__")[-1]: lay for n, lay in net.layers.items()}
    ws = {k: lay.params["weight"].detach().double().clone().requires_grad_() for k, lay in layers.items()}
    xr = x.detach().double().clone().requires_grad_()

    def lin(mod, w, t):
        return t @ (mod.weight.double() * (1 + w)[:, None]).t() + mod.bias.double()
    h = lin(model.proj, ws["proj"], xr)
    a, g = h.chunk(2, -1)
    yr = lin(model.out, ws["out"], a * F.gelu(g))
    ref_loss = (yr * gy.double()).sum() + ((h * gq.double()).sum() if other_consumer else 0)
    want = torch.autograd.grad(ref_loss, [xr] + [ws[n.split("__")[-1]] for n in net.layers])
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    for a_, b_ in zip(got, want):
        assert _rel(a_, b_) < tol


_TAPPED = []


def _tap(h):
    _TAPPED.append(h)
    return h


def test_ia3_geglu_sums_switch(fused):
    """``LYCO_IA3_GEGLU_SUMS``: captured steps only by default (no link outside :func:`graph_step`), ``0`` nowhere."""
    from lyco.algorithms import graph_policy, ia3
    spec = type("S", (), {"out_dim": 32})()
    fused.delenv("LYCO_IA3_GEGLU_SUMS", raising=False)
    assert ia3._link(spec, None) is None
    with graph_policy.graph_step():
        assert ia3._link(spec, None) is not None
    fused.setenv("LYCO_IA3_GEGLU_SUMS", "0")
    with graph_policy.graph_step():
        assert ia3._link(spec, None) is None
    spec.out_dim = 33  # an odd width is no GEGLU's projection
    fused.setenv("LYCO_IA3_GEGLU_SUMS", "1")
    assert ia3._link(spec, None) is None

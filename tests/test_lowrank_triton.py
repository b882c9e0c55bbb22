"""The fused Triton kernels of ``lyco.algorithms.lowrank_triton`` (GLoRA's ``W + k·U·D``, DoRA over LoRA),
run on the CPU in Triton's interpreter.

The GPU selects them for bf16/fp16 CUDA weights; here they run interpreted (tests/conftest.py sets
``TRITON_INTERPRET=1``) and are checked against the definitions written in float64 below — the kernels' outputs and their gradients, then whole
DoRA and GLoRA layers trained through the rebuilt op with the kernels forced in. Nothing is compared with a
value lyco computed some other way.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lyco
from lyco.algorithms import lowrank_triton


_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def kern(triton_interpreter):
    """lowrank_triton as the suite imports it: interpreted (tests/conftest.py sets TRITON_INTERPRET=1 before
    anything imports Triton), so its kernels run on CPU tensors."""
    assert lowrank_triton._UPCAST, "Triton was imported before tests/conftest.py set TRITON_INTERPRET"
    yield lowrank_triton


def _definition(w, up, down, mag, gain, s, detach=False):
    """W_eff = W + s·(W′·mag/n − W), W′ = W + γ·up·down, n = ‖W′‖_row + ε (float64; n constant if detached)."""
    wc = w + gain * up @ down
    n = wc.norm(dim=1, keepdim=True)
    if detach:
        n = n.detach()
    return w + s * (wc * mag.reshape(-1, 1) / (n + _EPS) - w)


# dtype → (tolerance on values, on gradients), relative to the largest entry. The interpreter converts
# fp32 → bf16 by truncation (one ulp = 2⁻⁷ relative), the GPU rounds to nearest.
TOL = {torch.float32: (2e-6, 2e-5), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("m,k,r", [(40, 300, 8), (33, 129, 12), (17, 64, 4), (18, 256, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s,detach", [(1.0, False), (0.6, False), (1.0, True)])
@pytest.mark.parametrize("programs", [1, 64])
def test_kernels_match_definition(kern, monkeypatch, m, k, r, dtype, s, detach, programs):
    """Whole rows per program (programs=1), and rows split over column ranges (programs=64: the
    norms, ⟨E, W′⟩ and ∂U summed over partial sums, the first split storing the row vectors)."""
    monkeypatch.setitem(kern._CFG, "programs", programs)
    monkeypatch.setitem(kern._CFG, "BK", 64)  # several sweep steps per split at these widths
    if programs > 1 and k > 64:
        assert kern._grid(torch.empty(m, k))[1] > 1  # the columns are split
    g = torch.Generator().manual_seed(m * k + r)
    w = torch.randn(m, k, generator=g).to(dtype)
    up = (0.3 * torch.randn(m, r, generator=g)).to(dtype)
    down = (0.3 * torch.randn(r, k, generator=g)).to(dtype)
    mag = torch.rand(m, generator=g) + 0.5
    e = torch.randn(m, k, generator=g).to(dtype)
    gain = 0.7
    tv, tg = TOL[dtype]

    out, vec = kern.build(w, up, down, gain, s, mag=mag)
    W, U, D, Mg, E = (t.double() for t in (w, up, down, mag, e))
    assert out.dtype == dtype and out.shape == w.shape
    assert _rel(out, _definition(W, U, D, Mg, gain, s)) < tv
    wc = W + gain * U @ D
    assert _rel(vec[2], wc.norm(dim=1)) < 1e-5           # the norms the backward reads
    assert _rel(vec[0], Mg / (wc.norm(dim=1) + _EPS)) < 1e-5
    again, _ = kern.build(w, up, down, gain, s, vec=vec)  # the backward's rebuild
    assert torch.equal(again, out)

    Ul, Dl, Ml = (t.clone().requires_grad_() for t in (U, D, Mg))
    _definition(W, Ul, Dl, Ml, gain, s, detach).backward(E)
    h, gu, gmag = kern.backward(e, w, up, down, vec, gain, s, detach, True, torch.float32)
    assert _rel(gu, Ul.grad) < tg
    assert _rel(up.double().t() @ h.double(), Dl.grad) < tg  # ∂D = Uᵀ·H, as dora.py forms it
    assert _rel(gmag, Ml.grad) < 1e-4 if dtype == torch.float32 else _rel(gmag, Ml.grad) < tg
    none_h, none_gu, gmag2 = kern.backward(e, w, up, down, vec, gain, s, detach, False, torch.float32)
    assert none_h is None and none_gu is None
    assert _rel(gmag2, Ml.grad) < 1e-4 if dtype == torch.float32 else _rel(gmag2, Ml.grad) < tg


def test_kernels_take_strided_weights(kern, monkeypatch):
    """A weight stored transposed (and a transposed E) is read through its strides."""
    monkeypatch.setitem(kern._CFG, "programs", 16)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(150, 24, generator=g).t()        # (24, 150), column-major
    up, down = torch.randn(24, 8, generator=g), torch.randn(8, 150, generator=g) * 0.2
    mag = torch.rand(24, generator=g) + 0.5
    e = torch.randn(150, 24, generator=g).t()
    out, vec = kern.build(w, up, down, 0.5, 1.0, mag=mag)
    assert _rel(out, _definition(w.double(), up.double(), down.double(), mag.double(), 0.5, 1.0)) < 2e-6
    Ul, Dl, Ml = (t.double().requires_grad_() for t in (up, down, mag))
    _definition(w.double(), Ul, Dl, Ml, 0.5, 1.0).backward(e.double())
    h, gu, gmag = kern.backward(e, w, up, down, vec, 0.5, 1.0, False, True, torch.float32)
    assert _rel(gu, Ul.grad) < 2e-5 and _rel(gmag, Ml.grad) < 1e-4
    assert _rel(up.double().t() @ h.double(), Dl.grad) < 2e-5


def _spy(monkeypatch, kern, names):
    """Force the kernels in (``usable`` true on the CPU) and count the calls of ``names``."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        fn = getattr(kern, name)

        def wrapped(*a, _fn=fn, _name=name, **kw):
            calls[_name] += 1
            return _fn(*a, **kw)
        monkeypatch.setattr(kern, name, wrapped)
    monkeypatch.setattr(kern, "usable", lambda w, rank: True)
    return calls



def _perturbed_tensors(model, multiplier, **create):
    """One adapter on ``model``'s only layer (rebuilt op), its tensors moved off their initialisation (an
    up of zeros would hide half the gradient), at ``multiplier``: the layer's tensor dict."""
    net = lyco.create(model, preset="full", seed=0, mode="rebuild", **create)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    net.set_multiplier(multiplier)
    (layer,) = net.layers.values()
    return layer.tensors()


def _step_matches_reference(model, x, dtype, params, reference, calls, expected_calls):
    """One forward and backward of ``model`` in ``dtype`` (the kernels' calls counted as expected), then its
    output and the gradients of ``params`` and x against ``reference(float64 leaves, float64 x)``."""
    xl = x.to(dtype).requires_grad_()
    y = model(xl)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert calls == expected_calls
    leaves = [p.detach().double().requires_grad_() for p in params]
    xr = xl.detach().double().requires_grad_()
    ref = reference(leaves, xr)
    ref.backward(gy.double())
    tv, tg = (1e-6, 1e-5) if dtype == torch.float32 else (3e-2, 6e-2)
    assert _rel(y, ref) < tv
    for p, want in zip((*params, xl), (*[lf.grad for lf in leaves], xr.grad)):
        assert p.grad is not None and p.grad.dtype == p.dtype
        assert _rel(p.grad, want) < tg

def _layer_reference(mod, up, down, mag, gain, s, x, detach):
    w = mod.weight.double()
    wd = _definition(w.reshape(w.shape[0], -1), up.double().flatten(1), down.double().flatten(1),
                     mag.double(), gain, s, detach).reshape(w.shape)
    b = mod.bias.double()
    return F.linear(x, wd, b) if w.dim() == 2 else F.conv2d(x, wd, b, padding=1)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s,detach", [(1.0, False), (0.6, False), (1.0, True)])
def test_layer_trains_through_kernels(kern, monkeypatch, kind, dtype, s, detach):
    """A DoRA layer (LoRA inside, magnitude on the output axis) on the rebuilt op with the kernels forced
    in: its output and the gradients of up, down, the magnitude and x equal the float64 definition."""
    calls = _spy(monkeypatch, kern, ["build", "backward"])
    monkeypatch.setitem(kern._CFG, "programs", 8)
    torch.manual_seed(0)
    mod = nn.Linear(40, 24) if kind == "linear" else nn.Conv2d(6, 20, 3, padding=1)
    x = torch.randn(3, 5, 40) if kind == "linear" else torch.randn(2, 6, 7, 7)
    model = nn.Sequential(mod).to(dtype)
    t = _perturbed_tensors(model, s, algo="lora", rank=4, alpha=3.0, conv_rank=4, conv_alpha=3.0, dora=True,
                           dora_detach_norm=detach)
    gain = float(t["alpha"]) / 4
    _step_matches_reference(
        model, x, dtype, [t["lora_up.weight"], t["lora_down.weight"], t["dora_scale"]],
        lambda leaves, xr: _layer_reference(mod, *leaves, gain, s, xr, detach),
        calls, {"build": 2, "backward": 1})  # forward build, backward rebuild, fused backward


def test_eligible_layers(monkeypatch):
    """The kernels are considered for CUDA bf16/fp16 weights of inner rank ≤ MAX_RANK only, and never with
    LYCO_TRITON=0; a CPU weight never (whatever its dtype)."""
    def cuda_weight(dtype):
        return SimpleNamespace(is_cuda=True, dtype=dtype)
    monkeypatch.delenv("LYCO_TRITON", raising=False)
    assert lowrank_triton.eligible(cuda_weight(torch.bfloat16), 16)
    assert lowrank_triton.eligible(cuda_weight(torch.float16), lowrank_triton.MAX_RANK)
    assert not lowrank_triton.eligible(cuda_weight(torch.float32), 16)
    assert not lowrank_triton.eligible(cuda_weight(torch.bfloat16), lowrank_triton.MAX_RANK + 1)
    assert not lowrank_triton.eligible(torch.zeros(2, 2, dtype=torch.bfloat16), 8)
    assert not lowrank_triton.usable(torch.zeros(2, 2, dtype=torch.bfloat16), 8)
    monkeypatch.setenv("LYCO_TRITON", "0")
    assert not lowrank_triton.eligible(cuda_weight(torch.bfloat16), 16)


def test_self_test_runs_once_per_device_and_dtype_and_never_during_capture(monkeypatch):
    """The self-test decides once per (device, dtype) and is remembered; during a CUDA graph capture nothing
    is decided (torch path) and the test runs at the next call outside it."""
    runs = []
    monkeypatch.setattr(lowrank_triton, "_CHECKED", {})
    monkeypatch.setattr(lowrank_triton, "_self_test", lambda dev, dt: runs.append((dev, dt)) or dt == torch.bfloat16)
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    dev = torch.device("cpu")
    assert lowrank_triton._checked(dev, torch.bfloat16) is False and runs == []
    capturing[0] = False
    assert lowrank_triton._checked(dev, torch.bfloat16) is True
    assert lowrank_triton._checked(dev, torch.bfloat16) is True
    assert lowrank_triton._checked(dev, torch.float16) is False
    assert lowrank_triton._checked(dev, torch.float16) is False
    assert runs == [(dev, torch.bfloat16), (dev, torch.float16)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_self_test_passes_on_working_kernels(kern, dtype, recwarn):
    assert kern._self_test(torch.device("cpu"), dtype) is True
    assert not [w for w in recwarn if "Triton kernels are off" in str(w.message)]


def test_self_test_turns_kernels_off_when_they_fail(kern, monkeypatch):
    """A kernel that cannot compile (an exception) or computes something else (a wrong value) turns the
    kernels off with one warning naming the reason, so training continues on the torch path."""
    def broken(*a, **k):
        raise RuntimeError("PTX assembly failed")
    monkeypatch.setattr(kern, "backward", broken)
    with pytest.warns(RuntimeWarning, match="PTX assembly failed"):
        assert kern._self_test(torch.device("cpu"), torch.bfloat16) is False
    monkeypatch.undo()
    real = kern.add_lowrank
    monkeypatch.setattr(kern, "add_lowrank", lambda w, u, d, gain: real(w, u, d, 1.5 * gain))
    with pytest.warns(RuntimeWarning, match="relative error"):
        assert kern._self_test(torch.device("cpu"), torch.bfloat16) is False


@pytest.mark.parametrize("m,k,r", [(40, 300, 16), (33, 129, 6), (17, 64, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("programs", [1, 64])
@pytest.mark.parametrize("with_up", [False, True])
@pytest.mark.parametrize("bm", [16, 64])
def test_add_lowrank_matches_definition(kern, monkeypatch, m, k, r, dtype, programs, with_up, bm):
    """``W + γ·U·D`` in one pass equals the float64 sum within one rounding of the output dtype; ``with_up``:
    ``[W + γ·U·D | U]``, U's columns exactly U (every row, whichever program wrote them); row blocks of 16 and 64
    (the tail block masked at every m here)."""
    monkeypatch.setitem(kern._MERGE_CFG, "programs", programs)
    monkeypatch.setitem(kern._MERGE_CFG, "BM", bm)
    monkeypatch.setitem(kern._MERGE_CFG, "BK", 64)
    g = torch.Generator().manual_seed(m + k + r)
    w = torch.randn(m, k, generator=g).to(dtype)
    up = torch.randn(m, r, generator=g).to(dtype)
    down = (0.3 * torch.randn(r, k, generator=g)).to(dtype)
    out = kern.add_lowrank(w, up, down, 0.4, with_up=with_up)
    assert out.dtype == dtype and out.shape == (m, k + r if with_up else k) and out.is_contiguous()
    assert _rel(out[:, :k], w.double() + 0.4 * up.double() @ down.double()) < TOL[dtype][0]
    if with_up:
        assert torch.equal(out[:, k:], up)


def _glora_reference(mod, a1, a2, b1, b2, gamma, x):
    """GLoRA's definition: W′ = W + γ·(W·A1·A2 + B1·B2) on the flattened weight (1×1 convs and linears)."""
    w = mod.weight.double()
    w2 = w.reshape(w.shape[0], -1)
    wp = (w2 + gamma * (w2 @ a1.flatten(1) @ a2.flatten(1) + b1.flatten(1) @ b2.flatten(1))).reshape(w.shape)
    b = mod.bias.double()
    return F.linear(x, wp, b) if w.dim() == 2 else F.conv2d(x, wp, b)


@pytest.mark.parametrize("kind", ["linear", "conv1x1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_glora_layer_trains_through_kernel(kern, monkeypatch, kind, dtype, multiplier):
    """A GLoRA layer on the rebuilt op with ``add_lowrank`` forced in (forward build and backward rebuild):
    output and the gradients of a1, a2, b1, b2 and x equal the float64 definition."""
    calls = _spy(monkeypatch, kern, ["add_lowrank"])
    monkeypatch.setitem(kern._MERGE_CFG, "programs", 8)
    torch.manual_seed(1)
    mod = nn.Linear(40, 24) if kind == "linear" else nn.Conv2d(24, 20, 1)
    x = torch.randn(3, 5, 40) if kind == "linear" else torch.randn(2, 24, 5, 5)
    model = nn.Sequential(mod).to(dtype)
    t = _perturbed_tensors(model, multiplier, algo="glora", rank=4, alpha=2.0)
    gamma = multiplier * float(t["alpha"]) / 4
    _step_matches_reference(
        model, x, dtype, [t[k] for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight")],
        lambda leaves, xr: _glora_reference(mod, *leaves, gamma, xr),
        calls, {"add_lowrank": 2})  # forward build, backward rebuild


@pytest.mark.parametrize("o,i,k,groups,r", [(6, 48, (3, 3), 4, 8), (40, 24, (3, 3), 8, 16), (17, 30, (1, 3), 5, 4),
                                            (33, 64, (3, 3), 2, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("programs", [1, 64])
@pytest.mark.parametrize("bm", [16, 64])
def test_add_lowrank_taps_matches_definition(kern, monkeypatch, o, i, k, groups, r, dtype, programs, bm):
    """``W + γ·U·kron(I_groups, D)`` on a channels-last conv weight, walked by taps: equal to the float64 sum on the
    NCHW weight within one rounding, the result channels-last in W's strides. Column tiles of 64 cross channel
    groups (12, 3, 6 or 32 channels each) and taps; row tiles cross the (out, group) rows' out channels."""
    monkeypatch.setitem(kern._MERGE_CFG, "programs", programs)
    monkeypatch.setitem(kern._MERGE_CFG, "BM", bm)
    monkeypatch.setitem(kern._MERGE_CFG, "BK", 64)
    g = torch.Generator().manual_seed(o + i + r)
    cg = i // groups
    w = torch.randn(o, i, *k, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    up = torch.randn(o, groups, r, generator=g).to(dtype)
    down = (0.3 * torch.randn(r, cg, *k, generator=g)).to(dtype)
    ref = w.double() + 0.4 * torch.einsum("omr,rcab->omcab", up.double(), down.double()).reshape(w.shape)
    dtaps = down.permute(0, 2, 3, 1).reshape(r, -1).contiguous()
    out = kern.add_lowrank_taps(w, up.reshape(o * groups, r), dtaps, 0.4, groups)
    assert out.dtype == dtype and out.shape == w.shape and out.stride() == w.stride()
    assert _rel(out, ref) < TOL[dtype][0]


def test_add_lowrank_taps_refuses_an_nchw_weight(kern):
    w = torch.randn(4, 8, 3, 3)
    with pytest.raises(ValueError, match="channels-last"):
        kern.add_lowrank_taps(w, torch.randn(8, 2), torch.randn(2, 36), 1.0, 2)

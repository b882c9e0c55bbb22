"""The Triton kernels of ``lyco.algorithms.factor_triton`` (LoHa's Khatri–Rao pair, LoKr's ``kron(W1, A)`` up),
run on the CPU in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``).

Each kernel's output and gradients are checked against the definitions written in float64 here, then whole
LoHa and LoKr layers are trained through them (forced in) against the float64 merged-weight layer. Nothing
is compared with a value lyco computed another way.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lyco
from lyco.algorithms import factor_triton, graph_policy


@pytest.fixture(scope="module")
def kern(triton_interpreter):
    from lyco.algorithms import lowrank_triton
    assert lowrank_triton._UPCAST, "Triton was imported before tests/conftest.py set TRITON_INTERPRET"
    yield factor_triton


# dtype → (tolerance on values, on gradients), relative to the largest entry. The interpreter converts
# fp32 → bf16 by truncation (one ulp = 2⁻⁷ relative), the GPU rounds to nearest.
TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def _leaves(dtype, *tensors):
    return [t.to(dtype).requires_grad_() for t in tensors]


@pytest.mark.parametrize("out,r1,r2,n", [(48, 8, 8, 300), (33, 3, 5, 129), (5, 1, 7, 17), (130, 16, 4, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_khatri_rao_matches_definition(kern, out, r1, r2, n, dtype):
    """Ka[o, i·r2+j] = a1[o,i]·a2[o,j], Kb[i·r2+j, c] = b1[i,c]·b2[j,c], and the gradients of a1, a2, b1, b2
    for random upstream gradients, against float64 autograd on the definition."""
    g = torch.Generator().manual_seed(out * n + r1)
    raw = [torch.randn(*s, generator=g) for s in ((out, r1), (out, r2), (r1, n), (r2, n))]
    gka, gkb = torch.randn(out, r1 * r2, generator=g), torch.randn(r1 * r2, n, generator=g)
    a1, a2, b1, b2 = _leaves(dtype, *raw)
    ka, kb = kern.khatri_rao(a1, a2, b1, b2)
    assert ka.shape == (out, r1 * r2) and kb.shape == (r1 * r2, n) and ka.dtype == kb.dtype == dtype
    torch.autograd.backward((ka, kb), (gka.to(dtype), gkb.to(dtype)))
    A1, A2, B1, B2 = (t.detach().double().requires_grad_() for t in (a1, a2, b1, b2))
    KA = torch.stack([torch.outer(A1[o], A2[o]).reshape(-1) for o in range(out)])
    KB = torch.stack([B1[i] * B2[j] for i in range(r1) for j in range(r2)])
    torch.autograd.backward((KA, KB), (gka.to(dtype).double(), gkb.to(dtype).double()))
    tv, tg = TOL[dtype]
    assert _rel(ka, KA) < tv and _rel(kb, KB) < tv
    for leaf, ref in zip((a1, a2, b1, b2), (A1, A2, B1, B2)):
        assert leaf.grad.dtype == dtype and leaf.grad.shape == leaf.shape
        assert _rel(leaf.grad, ref.grad) < tg


@pytest.mark.parametrize("ol,im,ok,r", [(8, 8, 40, 16), (3, 5, 7, 6), (1, 4, 100, 3), (16, 2, 5, 1),
                                        (12, 16, 9, 16)])  # the last: ∂A's programs loop over W1's rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kron_up_matches_definition(kern, ol, im, ok, r, dtype):
    """U = kron(W1, A) (torch.kron in float64), ∂W1 and ∂A for a random upstream gradient; several programs
    add their ∂W1 parts (A's rows split over programs)."""
    g = torch.Generator().manual_seed(ol * ok + r)
    w1, a = _leaves(dtype, torch.randn(ol, im, generator=g), torch.randn(ok, r, generator=g))
    gu = torch.randn(ol * ok, im * r, generator=g).to(dtype)
    u = kern.kron_up(w1, a)
    u.backward(gu)
    W1, A = (t.detach().double().requires_grad_() for t in (w1, a))
    U = torch.kron(W1, A)
    U.backward(gu.double())
    tv, tg = TOL[dtype]
    assert u.shape == U.shape and _rel(u, U) < tv
    assert _rel(w1.grad, W1.grad) < tg and _rel(a.grad, A.grad) < tg


@pytest.mark.parametrize("n,out,r1,r2,c", [(3, 48, 8, 8, 300), (2, 33, 3, 5, 129), (4, 5, 1, 7, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_khatri_rao_batched_matches_definition(kern, n, out, r1, r2, c, dtype):
    """The stacked Khatri–Rao pair (one launch for n members: ``factor_batch``'s) and its backward for random
    stacked ∂Ka, ∂Kb — each member against float64 autograd on the definition with its own factors."""
    g = torch.Generator().manual_seed(n * out + c)
    a1, a2 = (torch.randn(n, out, r, generator=g).to(dtype) for r in (r1, r2))
    b1, b2 = (torch.randn(n, r, c, generator=g).to(dtype) for r in (r1, r2))
    gka = torch.randn(n, out, r1 * r2, generator=g).to(dtype)
    gkb = torch.randn(n, r1 * r2, c, generator=g).to(dtype)
    ka, kb = kern.khatri_rao_batched(a1, a2, b1, b2)
    grads = kern.khatri_rao_backward_batched(a1, a2, b1, b2, gka, gkb)
    tv, tg = TOL[dtype]
    for b in range(n):
        A1, A2, B1, B2 = (t[b].double().requires_grad_() for t in (a1, a2, b1, b2))
        KA = torch.stack([torch.outer(A1[o], A2[o]).reshape(-1) for o in range(out)])
        KB = torch.stack([B1[i] * B2[j] for i in range(r1) for j in range(r2)])
        torch.autograd.backward((KA, KB), (gka[b].double(), gkb[b].double()))
        assert _rel(ka[b], KA) < tv and _rel(kb[b], KB) < tv
        for got, ref in zip(grads, (A1, A2, B1, B2)):
            assert _rel(got[b], ref.grad) < tg


@pytest.mark.parametrize("n,ol,im,ok,r", [(3, 8, 8, 40, 16), (2, 3, 5, 7, 6), (4, 12, 16, 9, 16), (17, 8, 8, 40, 16),
                                         (40, 3, 5, 37, 6), (2, 64, 16, 3, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kron_batched_matches_definition(kern, n, ol, im, ok, r, dtype):
    """The stacked forms (``factor_batch``'s): U[b] = kron(W1[b], A[b]) and, for a random stacked ∂U, ∂W1[b] and
    ∂A[b] — each member against torch.kron's float64 autograd on its own factors. The backward's launch geometry
    (the interpreter's device counts 4 multiprocessors: 16 programs aimed at): A's rows split over programs with
    ∂W1's partials summed after (3, 4 members), one program per member over several row blocks (17, 40: ragged
    blocks), one block (2); a W1 too large for two rows of A in a tile (64 × 16) the two-read launch."""
    g = torch.Generator().manual_seed(n * ok + r)
    w1 = torch.randn(n, ol, im, generator=g).to(dtype)
    a = torch.randn(n, ok, r, generator=g).to(dtype)
    gu = torch.randn(n, ol * ok, im * r, generator=g).to(dtype)
    u = kern.kron_forward_batched(w1, a)
    gw1, ga = kern.kron_backward_batched(w1, a, gu)
    tv, tg = TOL[dtype]
    assert u.shape == (n, ol * ok, im * r) and gw1.shape == w1.shape and ga.shape == a.shape
    for b in range(n):
        W1, A = (t[b].double().requires_grad_() for t in (w1, a))
        U = torch.kron(W1, A)
        U.backward(gu[b].double())
        assert _rel(u[b], U) < tv
        assert _rel(gw1[b], W1.grad) < tg and _rel(ga[b], A.grad) < tg


@pytest.mark.parametrize("ol,ok,im,c", [(8, 40, 8, 360), (3, 5, 7, 130), (2, 24, 3, 1440), (1, 3, 1, 1),
                                        (4, 33, 2, 200), (2, 5, 200, 130)])
@pytest.mark.parametrize("dtype,block", [(torch.bfloat16, None), (torch.float16, None), (torch.float32, None),
                                         (torch.bfloat16, 0), (torch.bfloat16, 2048)])
def test_kron_weight_grads_match_definition(kern, monkeypatch, ol, ok, im, c, dtype, block):
    """LoKr's rebuilt-op backward: for E ``(L, K, M, C)``, ``Σ_kc E[i,k,j,c]·W2[k,c]`` and ``Σ_ij E[i,k,j,c]·W1[i,j]``
    — the gradients of W1 and W2 through ``kron(W1, W2)`` (torch.kron's float64 autograd) for the upstream E. Tiles
    of (k, c) ragged in both (130, 200, 33 rows) and several programs per row of W1. Then the same scaled by s and
    written in other dtypes by the finishing launch: the fp32 sums times s, rounded once. Both forms of the first
    launch: the block form at its default budget (the loop form where M = 200 does not fit it) and a small one (the
    loop form past M = 16), and the loop form alone (budget 0). (The one-pass form, taken out after run 339, is
    checked in tests/test_experiment_kron_wgrad.py.)"""
    if block is not None:
        monkeypatch.setitem(kern._WGRAD_BLOCK, "elements", block)
    g = torch.Generator().manual_seed(ol * ok + c)
    e = torch.randn(ol, ok, im, c, generator=g).to(dtype)
    w1, w2 = torch.randn(ol, im, generator=g).to(dtype), torch.randn(ok, c, generator=g).to(dtype)
    g1, g2 = kern.kron_weight_grads(e, w1, w2)
    assert g1.dtype == g2.dtype == torch.float32 and g1.shape == (ol, im) and g2.shape == (ok, c)
    W1, W2 = (t.double().requires_grad_() for t in (w1, w2))
    torch.kron(W1, W2).backward(e.double().permute(0, 1, 2, 3).reshape(ol * ok, im * c))
    # fp32 sums of exact products: only the summation order differs from float64
    assert _rel(g1, W1.grad) < 1e-5 and _rel(g2, W2.grad) < 1e-5
    h1, h2 = kern.kron_weight_grads(e, w1, w2, -0.35, (torch.bfloat16, dtype))
    assert h1.dtype == torch.bfloat16 and h2.dtype == dtype and h1.shape == (ol, im) and h2.shape == (ok, c)
    # the fp32 sums scaled, then one rounding (the interpreter truncates to bf16: one ulp, not half)
    assert _rel(h1, -0.35 * W1.grad) < TOL[torch.bfloat16][0] and _rel(h2, -0.35 * W2.grad) < TOL[dtype][0]


def _programs(L, K, M, C, budget):
    """The block form's programs for E ``(L, K, M, C)`` at ``budget`` elements, from its definition: (k, c) tiles of
    up to 128 columns and ``budget / M`` elements (M padded to a power of two), one program per tile and row of W1."""
    mp = 1 << (M - 1).bit_length()
    bc = min(128, 1 << (C - 1).bit_length())
    bk = max(1, min(1 << (K - 1).bit_length(), budget // mp // bc))
    return L * len(range(0, K, bk)) * len(range(0, C, bc))


@pytest.mark.parametrize("tile", [1, 127, 128, 2500, 4096, 5000])
def test_kron_wgrad_tiles_are_powers_of_two(kern, tile):
    """The (k, c) tile's rows are a power of two at most the tile's rows (Triton's blocks must be), whatever the budget
    (``LYCO_KRON_WGRAD_BLOCK`` need not be a power of two); the tiles cover (k, c)."""
    bk, bc, ncb, tiles = kern._wgrad_tiles(160, 160, tile)
    assert bk & (bk - 1) == 0 and (bk <= max(1, tile // bc))
    assert bk * 2 > tile // bc or bk == 256  # the largest such power (K = 160 pads to 256)
    assert ncb * bc >= 160 and tiles * bk * bc >= 160 * 160 and tiles == -(-160 // bk) * ncb


@pytest.mark.parametrize("shape", [(8, 40, 8, 40), (8, 80, 8, 80), (8, 160, 8, 160), (8, 320, 8, 40), (2, 3, 100, 5),
                                   (2, 5, 200, 130)])
@pytest.mark.parametrize("least", [0, 32, 10 ** 6])
def test_kron_wgrad_block_budget_halves_to_the_fewest_programs(kern, monkeypatch, shape, least):
    """``LYCO_KRON_WGRAD_MIN_PROGRAMS``: the budget is the largest of 32768, 16384, 8192 whose launch has at least
    ``least`` programs — the smallest allowed (8192, or one 128-column row of M) where none has; then the reductions
    at that budget still equal float64's (SD1.5's 320 × 320 shape halves twice at 32)."""
    monkeypatch.setitem(kern._WGRAD_BLOCK, "min_programs", least)
    L, K, M, C = shape
    mp = 1 << (M - 1).bit_length()
    allowed = [b for b in (32768, 16384, 8192) if b >= mp * min(128, 1 << (C - 1).bit_length())]
    want = next((b for b in allowed if _programs(L, K, M, C, b) >= least), allowed[-1])
    assert kern._block_budget(L, K, M, C) == want
    if shape == (8, 40, 8, 40) and least == 32:
        assert want == 8192
        g = torch.Generator().manual_seed(3)
        e, w1, w2 = torch.randn(*shape, generator=g), torch.randn(L, M, generator=g), torch.randn(K, C, generator=g)
        g1, g2 = kern.kron_weight_grads(e, w1, w2, 0.5)
        E, W1, W2 = e.double(), w1.double(), w2.double()
        assert _rel(g1, 0.5 * (E * W2[None, :, None, :]).sum((1, 3))) < 1e-5
        assert _rel(g2, 0.5 * (E * W1[:, None, :, None]).sum((0, 2))) < 1e-5


@pytest.mark.parametrize("ol,ok,im,c", [(8, 40, 8, 360), (3, 5, 7, 130), (1, 3, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kron_merge_matches_definition(kern, ol, ok, im, c, dtype):
    """``W + s·kron(W1, W2)`` (torch.kron in float64) with fp32 factors and W in ``dtype``: within one rounding of W's
    dtype (the fp32 product and sum, then one rounding: one ulp, the interpreter's truncation); a transposed W2 view
    read through its strides."""
    g = torch.Generator().manual_seed(ol + c)
    w = torch.randn(ol * ok, im * c, generator=g).to(dtype)
    w1, w2t = torch.randn(ol, im, generator=g), torch.randn(c, ok, generator=g)
    out = kern.kron_merge(w.view(ol, ok, im, c), w1, w2t.t(), -0.7).view(w.shape)
    d = 0.7 * torch.kron(w1.double(), w2t.t().contiguous().double())
    ref = w.double() - d
    assert out.dtype == dtype
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 0.0  # bf16: the final rounding (the interpreter truncates)
    fp32 = 4 * 2.0 ** -24 * (w.double().abs() + d.abs())  # the fp32 product, scale and sum
    assert ((out.double() - ref).abs() <= ulp * ref.abs() + fp32).all()


def test_kernels_take_strided_factors(kern):
    """Transposed factors (LoKr's Tucker A is a transposed view; autograd hands transposed gradients) are read
    through their strides."""
    g = torch.Generator().manual_seed(3)
    a1, a2 = (torch.randn(4, 30, generator=g).t().requires_grad_() for _ in range(2))
    b1, b2 = (torch.randn(50, 4, generator=g).t().requires_grad_() for _ in range(2))
    gka = torch.randn(16, 30, generator=g).t()
    gkb = torch.randn(50, 16, generator=g).t()
    ka, kb = kern.khatri_rao(a1, a2, b1, b2)
    torch.autograd.backward((ka, kb), (gka, gkb))
    refs = [t.detach().clone().requires_grad_() for t in (a1, a2, b1, b2)]
    KA = (refs[0][:, :, None] * refs[1][:, None, :]).reshape(30, 16)
    KB = (refs[2][:, None] * refs[3][None]).reshape(16, 50)
    torch.autograd.backward((KA, KB), (gka, gkb))
    assert _rel(ka, KA.double()) < 1e-6 and _rel(kb, KB.double()) < 1e-6
    for leaf, ref in zip((a1, a2, b1, b2), refs):
        assert _rel(leaf.grad, ref.grad.double()) < 1e-5
    w1 = torch.randn(3, 4, generator=g).requires_grad_()
    a = torch.randn(6, 9, generator=g).t().requires_grad_()   # (9, 6), strides (1, 9)
    gu = torch.randn(4 * 6, 3 * 9, generator=g).t()           # U's shape (27, 24), strides (1, 27)
    u = kern.kron_up(w1, a)
    u.backward(gu)
    W1, A = w1.detach().clone().requires_grad_(), a.detach().contiguous().requires_grad_()
    U = torch.kron(W1, A)
    U.backward(gu.contiguous())  # torch.kron's backward cannot take this strided gradient
    assert _rel(u, U.double()) < 1e-6
    assert _rel(w1.grad, W1.grad.double()) < 1e-5 and _rel(a.grad, A.grad.double()) < 1e-5


def _force(monkeypatch, kern, name):
    """The kernels taken on the CPU (``usable`` true), counting the calls of ``name``."""
    calls = [0]
    fn = getattr(kern, name)

    def wrapped(*a, **k):
        calls[0] += 1
        return fn(*a, **k)
    monkeypatch.setattr(kern, name, wrapped)
    monkeypatch.setattr(kern, "usable", lambda t, inner: True)
    return calls


def _perturbed(model, multiplier, **create):
    net = lyco.create(model, preset="full", seed=0, **create)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    net.set_multiplier(multiplier)
    (layer,) = net.layers.values()
    return layer.tensors()


def _check_layer(mod, model, x, dtype, params, delta_weight):
    """One forward and backward in ``dtype``: output and the gradients of ``params`` and x against the float64
    layer with weight ``W + delta_weight(float64 leaves)``."""
    xl = x.to(dtype).requires_grad_()
    y = model(xl)
    gy = torch.randn_like(y)
    y.backward(gy)
    leaves = [p.detach().double().requires_grad_() for p in params]
    xr = xl.detach().double().requires_grad_()
    w = mod.weight.double() + delta_weight(leaves).reshape(mod.weight.shape)
    ref = F.linear(xr, w, mod.bias.double()) if w.dim() == 2 else F.conv2d(xr, w, mod.bias.double(), padding=1)
    ref.backward(gy.double())
    tv, tg = (1e-6, 1e-5) if dtype == torch.float32 else (3e-2, 6e-2)
    assert _rel(y, ref) < tv
    for p, want in zip((*params, xl), (*[lf.grad for lf in leaves], xr.grad)):
        assert p.grad is not None and p.grad.dtype == p.dtype
        assert _rel(p.grad, want) < tg


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["auto", "rebuild"])
def test_loha_layer_trains_through_kernels(kern, monkeypatch, kind, dtype, mode):
    """A LoHa layer (delta path, and the rebuilt op's low-rank form) with the Khatri–Rao kernel forced in: one
    launch forward, its output and every gradient equal to the float64 layer with ΔW = 0.7·γ·(A1B1)⊙(A2B2)."""
    calls = _force(monkeypatch, kern, "khatri_rao")
    torch.manual_seed(0)
    mod = nn.Linear(40, 24) if kind == "linear" else nn.Conv2d(6, 20, 3, padding=1)
    x = torch.randn(3, 5, 40) if kind == "linear" else torch.randn(2, 6, 7, 7)
    model = nn.Sequential(mod).to(dtype)
    t = _perturbed(model, 0.7, algo="loha", rank=3, alpha=2.0, conv_rank=2, conv_alpha=1.5, mode=mode)
    gain = 0.7 * float(t["alpha"]) / t["hada_w1_b"].shape[0]
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    _check_layer(mod, model, x, dtype, [t[k] for k in names],
                 lambda lv: gain * (lv[0] @ lv[1]) * (lv[2] @ lv[3]))
    assert calls[0] >= 1


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lokr_layer_trains_through_kernel(kern, monkeypatch, kind, dtype):
    """A LoKr layer with a low-rank W2 (its LoRA form) with the kron kernel forced in: output and every
    gradient equal to the float64 layer with ΔW = 0.7·γ·kron(W1, A·B)."""
    calls = _force(monkeypatch, kern, "kron_up")
    torch.manual_seed(1)
    mod = nn.Linear(64, 48) if kind == "linear" else nn.Conv2d(16, 24, 3, padding=1)
    x = torch.randn(3, 5, 64) if kind == "linear" else torch.randn(2, 16, 6, 6)
    model = nn.Sequential(mod).to(dtype)
    t = _perturbed(model, 0.7, algo="lokr", rank=2, alpha=1.5, conv_rank=2, conv_alpha=1.5, factor=4)
    assert "lokr_w2_a" in t and "lokr_w1" in t
    gain = 0.7 * float(t["alpha"]) / t["lokr_w2_b"].shape[0]
    _check_layer(mod, model, x, dtype, [t["lokr_w1"], t["lokr_w2_a"], t["lokr_w2_b"]],
                 lambda lv: gain * torch.kron(lv[0], lv[1] @ lv[2]))
    assert calls[0] == 1


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lokr_rebuilt_layer_trains_through_weight_grad_kernel(kern, monkeypatch, kind, dtype):
    """A LoKr layer with both factors full on the rebuilt op (``mode = "rebuild"``) with the merge and
    weight-gradient kernels forced in: output and every gradient equal to the float64 layer with ΔW = 0.7·kron(W1, W2)."""
    calls = _force(monkeypatch, kern, "kron_weight_grads")
    merges = _force(monkeypatch, kern, "kron_merge")
    torch.manual_seed(2)
    mod = nn.Linear(64, 48) if kind == "linear" else nn.Conv2d(16, 24, 3, padding=1)
    x = torch.randn(3, 5, 64) if kind == "linear" else torch.randn(2, 16, 6, 6)
    model = nn.Sequential(mod).to(dtype)
    t = _perturbed(model, 0.7, algo="lokr", rank=2, factor=4, full_matrix=True, mode="rebuild")
    assert set(t) == {"lokr_w1", "lokr_w2", "alpha"}
    _check_layer(mod, model, x, dtype, [t["lokr_w1"], t["lokr_w2"]],
                 lambda lv: 0.7 * torch.kron(lv[0], lv[1].reshape(lv[1].shape[0], -1)))
    assert calls[0] == 1 and merges[0] == 2  # the forward's merged weight and the backward's rebuild


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lokr_full_w2_op_merges_through_kernel(kern, monkeypatch, dtype):
    """A LoKr conv with both factors full on the bypass op's LoRA form (``kron(W1, I)·kron(I, W2)``, the rule
    forced) with the kernels forced in: the ∂x weight ``W + s·kron(W1, W2)`` by :func:`kron_merge` (W1 read off U's
    diagonal), output and every gradient equal to the float64 layer with ΔW = 0.7·kron(W1, W2)."""
    from lyco.algorithms.lokr import LoKr
    monkeypatch.setenv("LYCO_BYPASS_OP", "1")
    monkeypatch.setattr(LoKr, "EYE_POSITIONS", 1e9)
    merges = _force(monkeypatch, kern, "kron_merge")
    torch.manual_seed(3)
    mod = nn.Conv2d(16, 24, 3, padding=1)
    x = torch.randn(2, 16, 6, 6)
    model = nn.Sequential(mod).to(dtype)
    t = _perturbed(model, 0.7, algo="lokr", rank=2, factor=4, full_matrix=True)
    assert set(t) == {"lokr_w1", "lokr_w2", "alpha"}
    _check_layer(mod, model, x, dtype, [t["lokr_w1"], t["lokr_w2"]],
                 lambda lv: 0.7 * torch.kron(lv[0], lv[1].reshape(lv[1].shape[0], -1)))
    assert merges[0] == 1  # the backward's ∂x weight; the forward is exact (no merged weight)


def test_usable_needs_cuda_half_precision_and_the_switch(monkeypatch):
    """Considered for CUDA bf16/fp16 factors whose padded tile fits, never with LYCO_TRITON=0; a CPU tensor
    never."""
    monkeypatch.setattr(factor_triton, "_CHECKED", {(None, torch.bfloat16): True, (None, torch.float32): True})
    monkeypatch.setenv("LYCO_FACTOR_KERNELS", "1")  # the policy apart (test below)

    def cuda(dtype):
        return SimpleNamespace(is_cuda=True, dtype=dtype, device=None)
    monkeypatch.delenv("LYCO_TRITON", raising=False)
    assert factor_triton.usable(cuda(torch.bfloat16), factor_triton.kr_inner(8, 8))
    assert not factor_triton.usable(cuda(torch.bfloat16), factor_triton.kr_inner(64, 64))
    assert not factor_triton.usable(cuda(torch.float32), 64)
    assert not factor_triton.usable(torch.zeros(2, 2, dtype=torch.bfloat16), 64)
    monkeypatch.setenv("LYCO_TRITON", "0")
    assert not factor_triton.usable(cuda(torch.bfloat16), 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_self_test_passes_on_working_kernels(kern, dtype, recwarn):
    assert kern._self_test(torch.device("cpu"), dtype) is True
    assert not [w for w in recwarn if "Triton kernels are off" in str(w.message)]


def test_self_test_turns_kernels_off_when_they_fail(kern, monkeypatch):
    """A kernel that raises or computes a wrong value turns the family off with a warning naming why."""
    def broken(*a, **k):
        raise RuntimeError("PTX assembly failed")
    monkeypatch.setattr(kern, "_kron_backward", broken)
    with pytest.warns(RuntimeWarning, match="PTX assembly failed"):
        assert kern._self_test(torch.device("cpu"), torch.bfloat16) is False
    monkeypatch.undo()
    real = kern._kr_backward
    monkeypatch.setattr(kern, "_kr_backward", lambda *a: [g * 1.5 for g in real(*a)])
    with pytest.warns(RuntimeWarning, match="relative error"):
        assert kern._self_test(torch.device("cpu"), torch.bfloat16) is False


def test_policy_runs_the_kernels_in_graph_steps_only_by_default(monkeypatch):
    """``LYCO_FACTOR_KERNELS`` unset or ``graph``: only inside ``graph_step`` (nested blocks too); ``1``
    everywhere, ``0`` nowhere; anything else is an error naming the variable."""
    monkeypatch.delenv("LYCO_FACTOR_KERNELS", raising=False)
    assert not factor_triton.wanted()
    with graph_policy.graph_step():
        assert factor_triton.wanted()
        with graph_policy.graph_step():
            assert factor_triton.wanted()
        assert factor_triton.wanted()
    assert not factor_triton.wanted()
    with pytest.raises(RuntimeError), graph_policy.graph_step():
        raise RuntimeError("a failed capture")
    assert not factor_triton.wanted()  # left even when the block raised
    monkeypatch.setenv("LYCO_FACTOR_KERNELS", "1")
    assert factor_triton.wanted()
    monkeypatch.setenv("LYCO_FACTOR_KERNELS", "0")
    with graph_policy.graph_step():
        assert not factor_triton.wanted()
    monkeypatch.setenv("LYCO_FACTOR_KERNELS", "yes")
    with pytest.raises(ValueError, match="LYCO_FACTOR_KERNELS='yes'"):
        factor_triton.wanted()


def test_usable_follows_the_policy(monkeypatch):
    """A CUDA bf16 factor that passed the self-test is taken only where the policy wants the kernels."""
    monkeypatch.setattr(factor_triton, "_CHECKED", {(None, torch.bfloat16): True})
    monkeypatch.delenv("LYCO_FACTOR_KERNELS", raising=False)
    monkeypatch.delenv("LYCO_TRITON", raising=False)
    t = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=None)
    assert not factor_triton.usable(t, 64)
    with graph_policy.graph_step():
        assert factor_triton.usable(t, 64)

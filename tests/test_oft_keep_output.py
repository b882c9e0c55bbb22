"""Diag-OFT keeping the layer's output (``oft._RotateKeepOutput``) and its block-Gram kernel (``oft_triton``, run in
Triton's interpreter): against float64 definitions written here — ``W′_k = R_kᵀ·W_k`` per block of output rows with the
Cayley ``R = (I + Q)(I − Q)⁻¹``, ``Q = B − Bᵀ`` (COFT: ``Q·κ/(‖Q‖ + 1e-8)`` past κ = alpha·out), autograd in float64 —
never against lyco's other paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lyco
from lyco.algorithms import graph_policy, oft, oft_triton, rebuild
from lyco.algorithms.base import LINEAR, LayerSpec
from regen_helpers import kept_by_forward


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture()
def keep(monkeypatch):
    """The path forced on for every width (the CPU takes the torch form of the Gram)."""
    monkeypatch.setenv("LYCO_OFT_KEEP_OUTPUT", "1")
    monkeypatch.setenv("LYCO_OFT_KEEP_OUTPUT_MIN_IN", "0")


def _model(bias=True, constraint=0.0, dtype=torch.float64, seed=0, out=32, block=8):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the base layer's own initialisation
    model = nn.Sequential(nn.Linear(40, out, bias=bias)).to(dtype)
    net = lyco.create(model, algo="diag-oft", rank=block, constraint=constraint, seed=0)
    (layer,) = net.layers.values()
    with torch.no_grad():
        blocks = layer.params["oft_blocks"]
        blocks.copy_(0.3 * torch.randn(blocks.shape, generator=g, dtype=blocks.dtype))
    return model, net, layer


def _reference(model, layer, x, kappa):
    """float64: the layer's definition with the blocks a leaf, autograd throughout."""
    lin = model[0]
    blocks = layer.params["oft_blocks"].detach().double().clone().requires_grad_()
    xr = x.detach().double().clone().requires_grad_()
    q = blocks - blocks.transpose(1, 2)
    if kappa is not None:
        nq = torch.linalg.vector_norm(q) + 1e-8
        if nq > kappa:
            q = q * (kappa / nq)
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    nb, b = r.shape[0], r.shape[-1]
    w = lin.weight.double().reshape(nb, b, -1)
    w2 = (r.transpose(1, 2) @ w).reshape(lin.weight.shape)
    y = xr @ w2.t() + (lin.bias.double() if lin.bias is not None else 0)
    return y, xr, blocks


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("constraint", [0.0, 1e-3])
@pytest.mark.parametrize("lead", [(30,), (3, 10)])
def test_keep_output_matches_definition(keep, monkeypatch, bias, constraint, lead):
    """Output, ∂x and ∂blocks against the float64 definition; a constraint that binds (κ = 1e-3·32 below ‖Q‖) and
    none; a 3-D input."""
    model, net, layer = _model(bias, constraint)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, 40, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(*lead, 32, generator=g, dtype=torch.float64)
    calls = []
    orig = oft._RotateKeepOutput.apply
    monkeypatch.setattr(oft._RotateKeepOutput, "apply", lambda *a: calls.append(1) or orig(*a))
    y = model(x)
    assert calls, "the layer did not take the output-keeping op"
    y.backward(gy)
    # κ = alpha·out (LyCORIS's convention) from the alpha the file stores (fp32: 1e-3 is not exact there)
    kappa = float(layer.tensors()["alpha"]) * 32 if constraint else None
    ref, xr, blocks = _reference(model, layer, x, kappa)
    if kappa is not None:
        q = blocks.detach() - blocks.detach().transpose(1, 2)
        assert torch.linalg.vector_norm(q) > kappa, "the constraint does not bind: the test would not cover it"
    ref.backward(gy)
    assert _rel(y, ref) < 1e-12
    assert _rel(x.grad, xr.grad) < 1e-12
    assert _rel(layer.params["oft_blocks"].grad, blocks.grad) < 1e-9


def test_keep_output_saves_the_output_not_the_input(keep):
    """The op keeps y (which the next layer here keeps anyway) and no tensor of x's size."""
    model, net, layer = _model()
    x = torch.randn(64, 40, dtype=torch.float64, requires_grad=True)
    y, acts = kept_by_forward(lambda: model(x), 64 * 32)
    assert [t.data_ptr() for t in acts] == [y.data_ptr()], [tuple(t.shape) for t in acts]


def test_keep_output_rule(monkeypatch):
    """Narrow inputs, the switch off or at its default outside a graph step, a multiplier other than 1, a trainable base
    weight, a conv: the rebuilt op (which keeps x)."""
    monkeypatch.setenv("LYCO_OFT_KEEP_OUTPUT", "1")
    wide = LayerSpec(kind=LINEAR, weight_shape=(32, 512))
    narrow = LayerSpec(kind=LINEAR, weight_shape=(32, 511))
    blocks = torch.zeros(2, 16, 16)
    x = torch.zeros(2, 512)
    assert oft._keep_output(x, wide, torch.zeros(32, 512), None, blocks, 1.0)
    assert not oft._keep_output(x[:, :511], narrow, torch.zeros(32, 511), None, blocks, 1.0)
    assert not oft._keep_output(x, wide, torch.zeros(32, 512), None, blocks, 0.5)
    assert not oft._keep_output(x, wide, torch.zeros(32, 512).requires_grad_(), None, blocks, 1.0)
    assert not oft._keep_output(x, wide, torch.zeros(32, 512), torch.zeros(32).requires_grad_(), blocks, 1.0)
    with torch.no_grad():
        assert not oft._keep_output(x, wide, torch.zeros(32, 512), None, blocks, 1.0)
    monkeypatch.setenv("LYCO_OFT_KEEP_OUTPUT", "0")
    assert not oft._keep_output(x, wide, torch.zeros(32, 512), None, blocks, 1.0)
    monkeypatch.setenv("LYCO_OFT_KEEP_OUTPUT", "graph")  # the default: captured steps only
    assert not oft._keep_output(x, wide, torch.zeros(32, 512), None, blocks, 1.0)
    with graph_policy.graph_step():
        assert oft._keep_output(x, wide, torch.zeros(32, 512), None, blocks, 1.0)
    monkeypatch.setenv("LYCO_OFT_KEEP_OUTPUT", "1")
    monkeypatch.setenv("LYCO_OFT_KEEP_OUTPUT_MIN_IN", "wide")
    with pytest.raises(ValueError, match="LYCO_OFT_KEEP_OUTPUT_MIN_IN='wide'"):
        oft._keep_output(x, wide, torch.zeros(32, 512), None, blocks, 1.0)
    monkeypatch.setenv("LYCO_OFT_KEEP_OUTPUT_MIN_IN", "0")
    # a multiplier other than 1 goes through the rebuilt op, and its gradients are the definition's there too
    model, net, layer = _model()
    net.set_multiplier(0.5)
    seen = []
    orig = rebuild._RebuiltOp.apply
    monkeypatch.setattr(rebuild._RebuiltOp, "apply", lambda *a: seen.append(1) or orig(*a))
    model(torch.randn(4, 40, dtype=torch.float64))
    assert seen


def test_keep_output_under_autocast(keep):
    """The trainer's mixed precision: fp32 model and adapter, bf16 autocast, an fp32 input — the op's GEMMs in bf16,
    the gradients back in their tensors' dtypes, within bf16 rounding of the float64 definition."""
    model, net, layer = _model(dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 40, generator=g, requires_grad=True)
    gy = torch.randn(50, 32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().backward(gy)
    assert x.grad.dtype == torch.float32 and layer.params["oft_blocks"].grad.dtype == torch.float32
    ref, xr, blocks = _reference(model, layer, x, None)
    ref.backward(gy.double())
    assert _rel(y, ref) < 2e-2 and _rel(x.grad, xr.grad) < 2e-2
    assert _rel(layer.params["oft_blocks"].grad, blocks.grad) < 5e-2


def test_keep_output_trains_as_the_rebuilt_op(monkeypatch):
    """Three SGD steps on each path from the same start (the batched inverse serving both): the same blocks, float64."""
    out = []
    for mode in ("1", "0"):
        monkeypatch.setenv("LYCO_OFT_KEEP_OUTPUT", mode)
        monkeypatch.setenv("LYCO_OFT_KEEP_OUTPUT_MIN_IN", "0")
        model, net, layer = _model(seed=3)
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            x = torch.randn(20, 40, generator=g, dtype=torch.float64)
            model(x).square().sum().backward()
            with torch.no_grad():
                for p in net.trainable_parameters():
                    p.sub_(1e-3 * p.grad)
                    p.grad = None
        out.append(layer.params["oft_blocks"].detach().clone())
    assert _rel(out[0], out[1]) < 1e-10


@pytest.fixture(scope="module")
def kern(triton_interpreter):
    from lyco.algorithms import lowrank_triton
    assert lowrank_triton._UPCAST, "Triton was imported before tests/conftest.py set TRITON_INTERPRET"
    yield oft_triton


@pytest.mark.parametrize("n,c,b,bias", [(1000, 320, 16, True), (77, 96, 32, False), (300, 80, 16, True),
                                        (5, 64, 64, True), (200, 48, 16, False)])
def test_block_gram_kernel_matches_definition(kern, n, c, b, bias):
    """``Σ_t ∂y_kᵀ·(y_k − b_k)`` per block in float64 from the same stored values: ragged row steps, several steps per
    program, a partial column tile, a strided ∂y, blocks of 16 to 64 (fp32 inputs: the interpreter's dots)."""
    g = torch.Generator().manual_seed(n + c)
    gy = torch.randn(n, c + 8, generator=g)[:, 8:]
    y = torch.randn(n, c, generator=g)
    bv = torch.randn(c, generator=g) if bias else None
    got = kern.block_gram(gy, y, bv, b)
    assert got.shape == (c // b, b, b) and got.dtype == torch.float32
    v = y.double() - (bv.double() if bias else 0)
    ref = torch.stack([gy.double()[:, k * b:(k + 1) * b].t() @ v[:, k * b:(k + 1) * b] for k in range(c // b)])
    assert _rel(got, ref) < 1e-5  # fp32 sums of exact products: only the order differs


def test_block_gram_kernel_block_sizes():
    """Powers of two from 16 to 64 (a tensor-core dot's smallest side; the tile of accumulators)."""
    assert [b for b in range(1, 200) if oft_triton.supports(b)] == [16, 32, 64]


def _cayley64(blocks):
    """float64 R and M = (I − Q)⁻¹ of unconstrained blocks, from the formulas."""
    q = blocks - blocks.transpose(1, 2)
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    return (eye + q) @ torch.linalg.inv(eye - q), torch.linalg.inv(eye - q)


@pytest.mark.parametrize("shape,b", [((64, 40), 16), ((64, 8, 3, 3), 32), ((128, 300), 64)])
def test_rotate_rows_kernel_matches_definition(kern, shape, b):
    """``W + m·(R − I)ᵀ·W`` per block of b rows (m = 0.7) in float64 from the same fp32 values; a conv-shaped weight, a
    ragged last column tile, M with the column-major strides ``inv_ex`` gives it."""
    g = torch.Generator().manual_seed(b)
    nb = shape[0] // b
    blocks = 0.2 * torch.randn(nb, b, b, generator=g, dtype=torch.float64)
    r, minv = _cayley64(blocks)
    minv32 = torch.linalg.inv_ex(torch.eye(b) - (blocks - blocks.transpose(1, 2)).float())[0]
    assert not minv32.is_contiguous()  # the layout the op hands the kernel
    w = torch.randn(shape, generator=g)
    got = kern.rotate_rows(w, minv32, 2 * 0.7)
    wb = w.double().reshape(nb, b, -1)
    ref = (wb + 0.7 * (r - torch.eye(b, dtype=torch.float64)).transpose(1, 2) @ wb).reshape(shape)
    assert _rel(got, ref) < 1e-5


@pytest.mark.parametrize("gram", [True, False])
@pytest.mark.parametrize("b,parts", [(16, 3), (32, 1)])
def test_cayley_grad_kernel_matches_definition(kern, gram, b, parts):
    """∂blocks of ``⟨D, m·(R − I)ᵀ⟩`` by float64 autograd through the Cayley map, with ``D = G·Rᵀ`` (``gram``: the sum of
    the partials is the block Gram) or D the summed partials themselves; m = 0.7."""
    g = torch.Generator().manual_seed(b + parts)
    nb = 3
    blocks = (0.2 * torch.randn(nb, b, b, generator=g, dtype=torch.float64)).requires_grad_()
    part = torch.randn(parts, nb, b, b, generator=g)
    minv32 = torch.linalg.inv_ex(torch.eye(b) - (blocks - blocks.transpose(1, 2)).detach().float())[0]
    got = kern.cayley_grad(part, minv32, 2 * 0.7, torch.float32, gram)
    r, _ = _cayley64(blocks)
    s = part.double().sum(0)
    d = s @ r.detach().transpose(1, 2) if gram else s
    a = 0.7 * (r - torch.eye(b, dtype=torch.float64)).transpose(1, 2)
    (ref,) = torch.autograd.grad((d * a).sum(), blocks)
    assert got.shape == (nb, b, b) and got.dtype == torch.float32
    assert _rel(got, ref) < 1e-5


@pytest.mark.parametrize("keep_output", ["1", "0"])
def test_kernels_in_the_op_match_definition(kern, keep, monkeypatch, keep_output):
    """The op with the build and the Cayley backward in their kernels (the gate forced open on the CPU: the interpreter
    runs them): output, ∂x and ∂blocks against the float64 definition — the output-keeping op and the rebuilt op."""
    monkeypatch.setenv("LYCO_OFT_KEEP_OUTPUT", keep_output)
    used = []
    monkeypatch.setattr(oft_triton, "kernels_usable", lambda w, minv: used.append(1) or True)
    model, net, layer = _model(dtype=torch.float32, out=64, block=16)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(30, 40, generator=g, requires_grad=True)
    gy = torch.randn(30, 64, generator=g)
    y = model(x)
    y.backward(gy)
    assert used
    ref, xr, blocks = _reference(model, layer, x, None)
    ref.backward(gy.double())
    assert _rel(y, ref) < 1e-5 and _rel(x.grad, xr.grad) < 1e-5
    assert _rel(layer.params["oft_blocks"].grad, blocks.grad) < 1e-4


def test_keep_output_sums_partials_on_the_torch_path(keep, monkeypatch):
    """The Gram as per-chunk partial sums (what the GPU kernel hands over) on the torch Cayley backward (a binding
    constraint: the kernel takes unconstrained blocks only): the same gradients as the definition."""
    orig = oft_triton.block_gram_torch

    def split(*a):
        g = orig(*a)
        return torch.stack([0.25 * g, 0.75 * g])  # (2, nb, b, b)

    monkeypatch.setattr(oft_triton, "block_gram_torch", split)
    model, net, layer = _model(True, 1e-3)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(30, 40, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(30, 32, generator=g, dtype=torch.float64)
    model(x).backward(gy)
    ref, xr, blocks = _reference(model, layer, x, float(layer.tensors()["alpha"]) * 32)
    ref.backward(gy)
    assert _rel(layer.params["oft_blocks"].grad, blocks.grad) < 1e-9

"""LoHa: ΔW against an independent dense fp64 computation, the structured forward against the
merged layer, gradients, initialisation, export, and parity with lycoris-lora 4.1.3."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from lyco.algorithms import get
from lyco.algorithms import loha as loha_mod
from lyco.algorithms.base import LayerSpec
from lyco.algorithms.loha import LoHa

from lycoris.modules.loha import LohaModule

F64 = torch.float64
M = 0.7          # runtime multiplier used in the merge check
ALPHA = 2.5      # never equal to the ranks used below
TOL = dict(rtol=1e-10, atol=1e-10)

# name -> (layer factory, input shape)
LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), (3, 2, 12)),
    "linear_nobias": (lambda: nn.Linear(12, 10, bias=False), (4, 12)),
    "conv1d": (lambda: nn.Conv1d(6, 8, 3, padding=1), (2, 6, 9)),
    "conv2d_1x1": (lambda: nn.Conv2d(6, 8, 1), (2, 6, 5, 5)),
    "conv2d_3x3": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2), (2, 6, 9, 8)),
    "conv3d": (lambda: nn.Conv3d(4, 6, (3, 1, 2), padding=(1, 0, 1)), (2, 4, 4, 3, 5)),
    "conv2d_grouped": (lambda: nn.Conv2d(8, 6, 3, groups=2, padding=1), (2, 8, 6, 6)),
    "conv2d_reflect": (lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"), (2, 6, 6, 7)),
}

# (rank, use_tucker, use_scalar, rs_lora)
CONFIGS = [
    (2, False, False, False), (3, False, False, False), (2, True, False, False),
    (3, True, False, False), (2, False, True, False), (2, True, True, False),
    (2, False, False, True), (3, True, True, True),
]
CONFIG_IDS = [f"r{r}{'-tucker' if tk else ''}{'-scalar' if sc else ''}{'-rs' if rs else ''}"
              for r, tk, sc, rs in CONFIGS]
PATHS = ["auto", "structured", "dense"]

LOHA = get("loha")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny ops: intra-op threads only add synchronisation cost on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_layer(name, seed=0):
    torch.manual_seed(seed)
    factory, xshape = LAYERS[name]
    layer = factory().to(F64)
    x = torch.randn(xshape, dtype=F64)
    return layer, x


def opts_for(rank, tucker, scalar, rs):
    return LOHA.validate_options({"rank": rank, "alpha": ALPHA, "use_tucker": tucker,
                                  "use_scalar": scalar, "rs_lora": rs})


def random_tensors(layer, cfg, seed=1):
    """Our create() for the layer, every tensor then replaced by random non-zero fp64 values."""
    rank, tucker, scalar, rs = cfg
    spec = LayerSpec.from_module(layer)
    t = LOHA.create(spec, opts_for(rank, tucker, scalar, rs))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in t.items():
        if k == "alpha":
            out[k] = v.to(F64)
        elif k == "scalar":
            out[k] = torch.tensor(0.8, dtype=F64) + torch.rand((), generator=g, dtype=F64)
        else:
            out[k] = torch.randn(v.shape, generator=g, dtype=F64)
    return spec, out


def dense_reference(t, weight_shape):
    """ΔW written out independently: explicit einsums, γ = alpha / hada_w1_b.shape[0], once."""
    r = t["hada_w1_b"].shape[0]
    gamma = float(t["alpha"]) / r
    if "hada_t1" in t:
        h1 = torch.einsum("ij...,ip,jq->pq...", t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        h2 = torch.einsum("ij...,ip,jq->pq...", t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    else:
        h1 = torch.einsum("or,rc->oc", t["hada_w1_a"], t["hada_w1_b"])
        h2 = torch.einsum("or,rc->oc", t["hada_w2_a"], t["hada_w2_b"])
    dw = (h1 * h2).reshape(weight_shape) * gamma
    if "scalar" in t:
        dw = dw * t["scalar"]
    return dw


def force_path(monkeypatch, path):
    if path != "auto":
        monkeypatch.setattr(loha_mod, "khatri_rao_pays", lambda *a, **k: path == "structured")


def test_registered_and_detected():
    assert isinstance(LOHA, LoHa) and LOHA.name == "loha" and LOHA.supports_dora
    keys = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    assert LoHa.detect(keys)
    assert LoHa.detect(keys | {"hada_t1", "hada_t2"})
    assert not LoHa.detect({"lora_up.weight", "lora_down.weight"})
    assert not LoHa.detect({"hada_w1_b", "hada_w2_a", "hada_w2_b"})


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_delta_weight_matches_dense(layer_name, cfg):
    layer, _ = make_layer(layer_name)
    spec, t = random_tensors(layer, cfg)
    expected = dense_reference(t, layer.weight.shape)
    got = LOHA.delta_weight(t, spec, layer.weight)
    assert got.shape == layer.weight.shape
    torch.testing.assert_close(got, expected, **TOL)
    assert expected.abs().max() > 0


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_forward_delta_matches_merged_layer(layer_name, cfg, monkeypatch):
    """layer(x) with W + m·ΔW == layer(x) + m·forward_delta, on each path (auto choice, forced
    Khatri–Rao, forced materialisation; grouped/reflect layers always materialise)."""
    layer, x = make_layer(layer_name)
    spec, t = random_tensors(layer, cfg)
    merged = copy.deepcopy(layer)
    with torch.no_grad():
        merged.weight += M * dense_reference(t, layer.weight.shape)
        expected = merged(x)
        base_out = layer(x)
    for path in PATHS:
        force_path(monkeypatch, path)
        with torch.no_grad():
            dy = LOHA.forward_delta(x, t, spec, layer.weight, layer.bias, base_out)
        torch.testing.assert_close(base_out + M * dy, expected, **TOL, msg=lambda m: f"{path}: {m}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_gradients_match_dense(layer_name, cfg, monkeypatch):
    """Gradients through forward_delta (structured path, or the custom Hadamard autograd) reach
    every adapter tensor and equal autograd through the dense reference."""
    layer, x = make_layer(layer_name)
    spec, t = random_tensors(layer, cfg)
    trainable = [k for k in t if k != "alpha"]
    base_out = layer(x).detach()
    g_out = torch.randn(base_out.shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    ref = {k: (v.clone().requires_grad_(k in trainable)) for k, v in t.items()}
    dw = dense_reference(ref, layer.weight.shape)
    params = {"weight": layer.weight.detach() + dw}
    if layer.bias is not None:
        params["bias"] = layer.bias.detach()
    y = torch.func.functional_call(layer, params, (x,))
    ((y - base_out) * g_out).sum().backward()
    for path in ("structured", "dense"):
        force_path(monkeypatch, path)
        ours = {k: (v.clone().requires_grad_(k in trainable)) for k, v in t.items()}
        dy = LOHA.forward_delta(x, ours, spec, layer.weight, layer.bias, base_out)
        (dy * g_out).sum().backward()
        for k in trainable:
            assert ours[k].grad is not None, (path, k)
            assert ours[k].grad.abs().max() > 0, (path, k)
            torch.testing.assert_close(ours[k].grad, ref[k].grad, rtol=1e-9, atol=1e-9,
                                       msg=lambda m: f"{path} {k}: {m}")


def test_hada_product_autograd_gradcheck():
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, dtype=F64, generator=g, requires_grad=True)
            for s in ((5, 2), (2, 7), (5, 3), (3, 7))]
    assert torch.autograd.gradcheck(loha_mod._HadaProduct.apply, args)


@pytest.mark.parametrize("layer_name", ["linear", "conv1d", "conv2d_3x3", "conv3d"])
@pytest.mark.parametrize("tucker", [False, True])
def test_structured_path_never_materialises_when_it_pays(layer_name, tucker, monkeypatch):
    """A layer wide enough for the Khatri–Rao form: forward_delta must not build ΔW."""
    big = {"linear": nn.Linear(48, 40), "conv1d": nn.Conv1d(24, 32, 3),
           "conv2d_3x3": nn.Conv2d(24, 32, 3, stride=2, padding=1), "conv3d": nn.Conv3d(16, 24, 3)}
    layer = big[layer_name].to(F64)
    spec = LayerSpec.from_module(layer)
    cfg = (2, tucker, False, False)
    _, t = random_tensors(layer, cfg)
    assert loha_mod.khatri_rao_pays(spec, 4, tucker and spec.is_kxk_conv)
    x = torch.randn((2, spec.in_dim) + (5,) * len(spec.kernel) if spec.is_conv else (3, 48), dtype=F64)
    expected = layer_op_dense(layer, x, dense_reference(t, layer.weight.shape))

    def boom(*a, **k):
        raise AssertionError("ΔW was materialised")
    monkeypatch.setattr(LoHa, "delta_weight", boom)
    got = LOHA.forward_delta(x, t, spec, layer.weight, layer.bias, layer(x))
    torch.testing.assert_close(got, expected, **TOL)


def layer_op_dense(layer, x, dw):
    m = copy.deepcopy(layer)
    with torch.no_grad():
        m.weight.copy_(dw)
        if m.bias is not None:
            m.bias.zero_()
        return m(x)


def test_khatri_rao_pays_cost_model():
    lin = LayerSpec("linear", (10, 12))
    assert loha_mod.khatri_rao_pays(lin, 4)        # 4·22 < 120
    assert not loha_mod.khatri_rao_pays(lin, 9)    # 9·22 > 120
    big = LayerSpec("linear", (4096, 4096))
    assert not loha_mod.khatri_rao_pays(big, loha_mod.MAX_KHATRI_RAO_RANK + 1)


# -- creation ------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_create_shapes_and_zero_start(layer_name, cfg):
    rank, tucker, scalar, rs = cfg
    layer, _ = make_layer(layer_name)
    spec = LayerSpec.from_module(layer)
    t = LOHA.create(spec, opts_for(*cfg))
    out_dim, in_dim, k = spec.out_dim, spec.in_dim, tuple(layer.weight.shape[2:])
    if tucker and any(v != 1 for v in k):
        for i in (1, 2):
            assert t[f"hada_w{i}_a"].shape == (rank, out_dim)
            assert t[f"hada_w{i}_b"].shape == (rank, in_dim)
            assert t[f"hada_t{i}"].shape == (rank, rank) + k
    else:
        assert "hada_t1" not in t and "hada_t2" not in t
        for i in (1, 2):
            assert t[f"hada_w{i}_a"].shape == (out_dim, rank)
            assert t[f"hada_w{i}_b"].shape == (rank, in_dim * math.prod(k))
    assert LOHA.rank(t) == rank
    expected_alpha = ALPHA * math.sqrt(rank) if rs else ALPHA
    assert float(t["alpha"]) == pytest.approx(expected_alpha)
    assert LOHA.scale(t) == pytest.approx(ALPHA / math.sqrt(rank) if rs else ALPHA / rank)
    assert all(v.dtype == torch.float32 for v in t.values())
    # ΔW starts at exactly zero, through either the zero w2_a or the zero scalar
    assert torch.count_nonzero(LOHA.delta_weight(t, spec)) == 0
    if scalar:
        assert float(t["scalar"]) == 0 and torch.count_nonzero(t["hada_w2_a"]) > 0
    else:
        assert "scalar" not in t and torch.count_nonzero(t["hada_w2_a"]) == 0
    assert torch.count_nonzero(t["hada_w1_a"]) > 0 and torch.count_nonzero(t["hada_w2_b"]) > 0


def test_create_honours_generator():
    spec = LayerSpec.from_module(nn.Conv2d(6, 8, 3))
    opts = opts_for(2, True, True, False)
    a = LOHA.create(spec, opts, generator=torch.Generator().manual_seed(3))
    b = LOHA.create(spec, opts, generator=torch.Generator().manual_seed(3))
    c = LOHA.create(spec, opts, generator=torch.Generator().manual_seed(4))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not torch.equal(a["hada_w1_b"], c["hada_w1_b"])


@pytest.mark.parametrize("cfg", [(4, False, False, False), (4, True, True, False), (3, True, False, True)])
def test_create_distribution_matches_lycoris_module(cfg):
    """Same seed on the global RNG → the same tensors as LyCORIS's LohaModule (same draw order,
    same distributions)."""
    rank, tucker, scalar, rs = cfg
    layer = nn.Conv2d(6, 8, 3)
    torch.manual_seed(11)
    ly = LohaModule("m", layer, 1.0, rank, ALPHA, use_tucker=tucker, use_scalar=scalar, rs_lora=rs)
    torch.manual_seed(11)
    t = LOHA.create(LayerSpec.from_module(layer), opts_for(*cfg))
    sd = dict(ly.named_parameters())
    for k, v in t.items():
        if k in ("alpha", "scalar"):
            continue
        torch.testing.assert_close(v, sd[k].detach(), rtol=0, atol=0, msg=k)
    assert float(t["alpha"]) == pytest.approx(float(ly.alpha))


# -- export --------------------------------------------------------------------------------

@pytest.mark.parametrize("layer_name", ["linear", "conv2d_3x3"])
@pytest.mark.parametrize("tucker", [False, True])
def test_export_folds_scalar_into_w1_a(layer_name, tucker):
    layer, _ = make_layer(layer_name)
    spec, t = random_tensors(layer, (2, tucker, True, False))
    out = LOHA.export(t)
    assert "scalar" not in out
    torch.testing.assert_close(out["hada_w1_a"], t["hada_w1_a"] * t["scalar"], **TOL)
    for k in t:
        if k not in ("scalar", "hada_w1_a"):
            assert out[k] is t[k] or torch.equal(out[k], t[k])
    torch.testing.assert_close(LOHA.delta_weight(out, spec), dense_reference(t, layer.weight.shape), **TOL)


# -- parity with lycoris-lora 4.1.3 ---------------------------------------------------------

def lycoris_module(layer, t, cfg, bypass):
    rank, tucker, scalar, rs = cfg
    ly = LohaModule("m", layer, 1.0, rank, ALPHA, use_tucker=tucker, use_scalar=scalar,
                    rs_lora=rs, bypass_mode=bypass).to(F64)
    with torch.no_grad():
        for name, p in ly.named_parameters():
            if name == "scalar":
                p.copy_(t["scalar"])
            else:
                p.copy_(t[name])
        if scalar:
            assert isinstance(ly.scalar, nn.Parameter)
    assert float(ly.alpha) == pytest.approx(float(t["alpha"]))
    return ly


# LyCORIS's forward ignores padding_mode (it calls F.conv2d with the padding only), so the
# reflect-padded layer is left out of the parity comparison (it is covered by the dense tests).
PARITY_LAYERS = [n for n in LAYERS if n != "conv2d_reflect"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layer_name", PARITY_LAYERS)
def test_forward_parity_with_lycoris(layer_name, cfg):
    """LyCORIS's forward (rebuild mode and bypass mode) minus the base output == our Δy."""
    layer, x = make_layer(layer_name)
    spec, t = random_tensors(layer, cfg)
    with torch.no_grad():
        base_out = layer(x)
        ours = LOHA.forward_delta(x, t, spec, layer.weight, layer.bias, base_out)
        for bypass in (False, True):
            ly_delta = lycoris_module(layer, t, cfg, bypass)(x) - base_out
            assert ly_delta.abs().max() > 0
            # rtol 1e-7: our alpha is an fp32 tensor (as in files); LyCORIS keeps α/√r as a float
            torch.testing.assert_close(ours, ly_delta, rtol=1e-7, atol=1e-10,
                                       msg=lambda m: f"bypass={bypass}: {m}")


@pytest.mark.parametrize("cfg", [(2, False, False, False), (3, True, False, False), (2, False, False, True)],
                         ids=["plain", "tucker", "rs"])
def test_lycoris_merge_applies_gamma_twice(cfg):
    """Documents LyCORIS's bug that we do not copy: get_diff_weight (its merge) = γ · forward ΔW."""
    layer, x = make_layer("conv2d_3x3")
    spec, t = random_tensors(layer, cfg)
    ly = lycoris_module(layer, t, cfg, bypass=False)
    with torch.no_grad():
        ly_merge_dw = ly.get_diff_weight(1.0, shape=ly.shape)[0]
        ours = LOHA.delta_weight(t, spec)
        gamma = LOHA.scale(t)
        assert gamma != pytest.approx(1.0)
        torch.testing.assert_close(ly_merge_dw, gamma * ours, rtol=1e-7, atol=1e-10)
        assert not torch.allclose(ly_merge_dw, ours)
        # ... while its forward agrees with our ΔW (γ once)
        torch.testing.assert_close(ly(x) - layer(x), layer_op_dense(layer, x, ours), rtol=1e-7, atol=1e-10)


def test_khatri_rao_products_and_their_gradients():
    """The Khatri–Rao products against their definition (outer products per row / column) in float64,
    and their gradients against autograd through that definition."""
    g = torch.Generator().manual_seed(0)
    a1, a2 = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    b1, b2 = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (a1, a2, b1, b2)]
    rows = loha_mod.khatri_rao_rows(a1, a2)
    cols = loha_mod.khatri_rao_cols(b1, b2)
    want_rows = torch.stack([torch.outer(a1[o], a2[o]).reshape(-1) for o in range(7)])       # (7, 12)
    want_cols = torch.stack([torch.outer(b1[:, c], b2[:, c]).reshape(-1) for c in range(5)], 1)  # (12, 5)
    torch.testing.assert_close(rows, want_rows, rtol=0, atol=0)
    torch.testing.assert_close(cols, want_cols, rtol=0, atol=0)
    gr, gc = torch.randn(rows.shape, generator=g, dtype=torch.float64), torch.randn(cols.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((rows * gr).sum() + (cols * gc).sum(), leaves)
    want = torch.autograd.grad((want_rows * gr).sum() + (want_cols * gc).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

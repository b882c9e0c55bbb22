"""LoKr: shapes/splits, ΔW against an independent dense fp64 computation (explicit block loops),
the structured vec(W1·X·W2ᵀ) forward against the merged layer, gradients, initialisation,
export, and parity with lycoris-lora 4.1.3's LokrModule."""

import math

import pytest
import torch
import torch.nn as nn

from lyco.algorithms import get
from lyco.algorithms.base import LayerSpec
from lyco.algorithms.lokr import LoKr, lokr_shapes

from lycoris.modules.lokr import LokrModule

F64 = torch.float64
M = 0.7          # runtime multiplier used in the merge check
ALPHA = 2.5      # never equal to the ranks used below
TOL = dict(rtol=1e-10, atol=1e-10)

# name -> (layer factory, input shape); dims chosen so that every split is non-trivial
LAYERS = {
    "linear": (lambda: nn.Linear(36, 48), (3, 2, 36)),                        # in 6·6, out 6·8
    "linear_nobias": (lambda: nn.Linear(12, 10, bias=False), (4, 12)),        # in 3·4, out 2·5
    "conv1d": (lambda: nn.Conv1d(12, 8, 3, padding=1), (2, 12, 9)),
    "conv2d_1x1": (lambda: nn.Conv2d(24, 36, 1), (2, 24, 5, 5)),
    "conv2d_3x3": (lambda: nn.Conv2d(24, 36, 3, stride=2, padding=2, dilation=2), (2, 24, 9, 8)),
    "conv3d": (lambda: nn.Conv3d(8, 12, (3, 1, 2), padding=(1, 0, 1)), (2, 8, 4, 3, 5)),
    "conv2d_grouped": (lambda: nn.Conv2d(16, 12, 3, groups=2, padding=1), (2, 16, 6, 6)),
    "conv2d_reflect": (lambda: nn.Conv2d(12, 8, 3, padding=1, padding_mode="reflect"), (2, 12, 6, 7)),
}

OPTION_NAMES = ("rank", "factor", "decompose_both", "full_matrix", "unbalanced_factorization",
                "use_tucker", "use_scalar", "rs_lora")
CONFIGS = [
    (2, -1, False, False, False, False, False, False),
    (2, -1, True, False, False, False, False, False),
    (2, -1, False, True, False, False, False, False),
    (2, -1, False, False, True, False, False, False),
    (2, -1, False, False, False, True, False, False),
    (2, -1, True, False, False, True, True, False),
    (1, 2, True, False, False, False, False, True),
    (2, 4, False, False, False, True, False, True),
    (2, 3, True, False, False, False, False, False),
    (8, -1, False, False, False, False, False, False),
    (8, -1, False, False, False, False, True, True),
    (1, -1, True, False, True, True, True, False),
    (3, -1, True, False, True, False, False, False),
]


def cfg_id(c):
    r, f, db, fm, ub, tk, sc, rs = c
    return "".join([f"r{r}", f"-f{f}" if f != -1 else "", "-both" if db else "", "-full" if fm else "",
                    "-unbal" if ub else "", "-tucker" if tk else "", "-scalar" if sc else "",
                    "-rs" if rs else ""])


CONFIG_IDS = [cfg_id(c) for c in CONFIGS]
LOKR = get("lokr")


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
    return factory().to(F64), torch.randn(xshape, dtype=F64)


def opts_for(cfg, alpha=ALPHA):
    return LOKR.validate_options({"alpha": alpha, **dict(zip(OPTION_NAMES, cfg))})


def random_tensors(layer, cfg, seed=1):
    """Our create() for the layer, every tensor then replaced by random non-zero fp64 values."""
    spec = LayerSpec.from_module(layer)
    t = LOKR.create(spec, opts_for(cfg))
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
    """ΔW written out independently: W1, W2 rebuilt with einsums, the Kronecker product by
    explicit block loops, γ = 1 if both factors are full else alpha / (w2_b or w1_b).shape[0]."""
    out, inn, *k = weight_shape
    k = tuple(k)
    w1 = t["lokr_w1"] if "lokr_w1" in t else torch.einsum("ar,rb->ab", t["lokr_w1_a"], t["lokr_w1_b"])
    out_l, in_m = w1.shape
    out_k, in_n = out // out_l, inn // in_m
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].reshape((out_k, in_n) + k)
    elif "lokr_t2" in t:
        w2 = torch.einsum("ij...,ip,jq->pq...", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = torch.einsum("ar,rc->ac", t["lokr_w2_a"], t["lokr_w2_b"]).reshape((out_k, in_n) + k)
    dw = torch.zeros(weight_shape, dtype=F64)
    for i in range(out_l):
        for j in range(in_m):
            dw[i * out_k:(i + 1) * out_k, j * in_n:(j + 1) * in_n] = w1[i, j] * w2
    if "lokr_w1" in t and "lokr_w2" in t:
        gamma = 1.0
    else:
        rank = (t["lokr_w2_b"] if "lokr_w2_b" in t else t["lokr_w1_b"]).shape[0]
        gamma = float(t["alpha"]) / rank
    dw = dw * gamma
    if "scalar" in t:
        dw = dw * t["scalar"]
    return dw


def layer_with_weight(layer, x, weight, zero_bias=False):
    params = {"weight": weight}
    if layer.bias is not None:
        params["bias"] = torch.zeros_like(layer.bias) if zero_bias else layer.bias.detach()
    return torch.func.functional_call(layer, params, (x,))


def structured_possible(layer):
    return isinstance(layer, nn.Linear) or (layer.groups == 1 and layer.padding_mode == "zeros")


# -- registry, detection --------------------------------------------------------------------

def test_registered_and_detected():
    assert isinstance(LOKR, LoKr) and LOKR.name == "lokr" and LOKR.supports_dora
    assert LoKr.detect({"lokr_w1", "lokr_w2", "alpha"})
    assert LoKr.detect({"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"})
    assert LoKr.detect({"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})
    assert not LoKr.detect({"lokr_w2", "alpha"})
    assert not LoKr.detect({"hada_w1_a", "hada_w1_b"})


# -- shapes -----------------------------------------------------------------------------------

def test_reference_shape_examples():
    """The examples of the reference (§1.3), ran against LyCORIS there."""
    conv = LayerSpec("conv2d", (640, 320, 3, 3))
    assert lokr_shapes(conv, 8, 8) == {"lokr_w1": (8, 8), "lokr_w2_a": (80, 8), "lokr_w2_b": (8, 360)}
    assert lokr_shapes(conv, 8, 8, tucker=True) == {
        "lokr_w1": (8, 8), "lokr_t2": (8, 8, 3, 3), "lokr_w2_a": (8, 80), "lokr_w2_b": (8, 40)}
    lin = LayerSpec("linear", (768, 320))
    assert lokr_shapes(lin, 8, -1) == {"lokr_w1": (24, 16), "lokr_w2_a": (32, 8), "lokr_w2_b": (8, 20)}


def lycoris_params(layer, cfg, alpha=ALPHA, bypass=False):
    r, f, db, fm, ub, tk, sc, rs = cfg
    return LokrModule("m", layer, 1.0, r, alpha, use_tucker=tk, use_scalar=sc, decompose_both=db,
                      factor=f, full_matrix=fm, rs_lora=rs, unbalanced_factorization=ub,
                      bypass_mode=bypass)


SHAPE_LAYERS = [
    lambda: nn.Linear(12, 10), lambda: nn.Linear(36, 48), lambda: nn.Linear(64, 64),
    lambda: nn.Linear(127, 30), lambda: nn.Linear(320, 768), lambda: nn.Conv1d(12, 8, 3),
    lambda: nn.Conv2d(24, 36, 3), lambda: nn.Conv2d(32, 64, 1), lambda: nn.Conv3d(4, 6, 3),
    lambda: nn.Conv2d(16, 12, 3, groups=2), lambda: nn.Conv2d(40, 80, (3, 1)),
]


@pytest.mark.parametrize("make", SHAPE_LAYERS, ids=lambda f: "")
def test_shapes_match_lycoris_module(make):
    """Names and shapes of what we create == the parameters of LyCORIS's LokrModule, over many
    option combinations (factor, rank, decompose_both, full_matrix, unbalanced, tucker)."""
    layer = make()
    spec = LayerSpec.from_module(layer)
    kinds = set()
    for factor in (-1, 2, 4, 8):
        for rank in (1, 2, 4, 8):
            for bits in range(16):
                db, fm, ub, tk = (bool(bits >> i & 1) for i in range(4))
                if fm and rank != 2:
                    continue  # full_matrix ignores the rank
                cfg = (rank, factor, db, fm, ub, tk, False, False)
                ours = {k: tuple(v.shape) for k, v in LOKR.create(spec, opts_for(cfg)).items()
                        if k not in ("alpha", "scalar")}
                ly = {k: tuple(v.shape) for k, v in lycoris_params(layer, cfg).named_parameters()}
                assert ours == ly, (cfg, ours, ly)
                kinds.add(tuple(sorted(ours)))
    assert len(kinds) >= 2


def test_config_grid_covers_every_structure():
    """The (layer × config) grid used below exercises every tensor layout."""
    seen = set()
    for name in LAYERS:
        layer, _ = make_layer(name)
        for cfg in CONFIGS:
            seen.add(frozenset(LOKR.create(LayerSpec.from_module(layer), opts_for(cfg))) - {"alpha", "scalar"})
    w1 = [{"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"}]
    w2 = [{"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"}, {"lokr_w2_a", "lokr_w2_b", "lokr_t2"}]
    for a in w1:
        for b in w2:
            assert frozenset(a | b) in seen, (a, b)


# -- the math ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_delta_weight_matches_dense(layer_name, cfg):
    layer, _ = make_layer(layer_name)
    spec, t = random_tensors(layer, cfg)
    expected = dense_reference(t, tuple(layer.weight.shape))
    got = LOKR.delta_weight(t, spec, layer.weight)
    assert got.shape == layer.weight.shape
    torch.testing.assert_close(got, expected, **TOL)
    assert expected.abs().max() > 0


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_forward_delta_matches_merged_layer(layer_name, cfg, monkeypatch):
    """layer(x) with W + m·ΔW == layer(x) + m·forward_delta; where the structured path applies,
    forward_delta must not materialise ΔW at all."""
    layer, x = make_layer(layer_name)
    spec, t = random_tensors(layer, cfg)
    with torch.no_grad():
        expected = layer_with_weight(layer, x, layer.weight + M * dense_reference(t, tuple(layer.weight.shape)))
        base_out = layer(x)
    if structured_possible(layer):
        def boom(*a, **k):
            raise AssertionError("ΔW was materialised")
        monkeypatch.setattr(LoKr, "delta_weight", boom)
    with torch.no_grad():
        dy = LOKR.forward_delta(x, t, spec, layer.weight, layer.bias, base_out)
    torch.testing.assert_close(base_out + M * dy, expected, **TOL)


@pytest.mark.parametrize("layer_name", ["linear", "conv1d", "conv2d_3x3"])
def test_forward_delta_unbatched_input(layer_name):
    layer, x = make_layer(layer_name)
    cfg = (2, -1, True, False, False, True, False, False)
    spec, t = random_tensors(layer, cfg)
    x1 = x[0]
    with torch.no_grad():
        expected = layer_with_weight(layer, x1, dense_reference(t, tuple(layer.weight.shape)), zero_bias=True)
        got = LOKR.forward_delta(x1, t, spec, layer.weight, layer.bias, layer(x1))
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_gradients_match_dense(layer_name, cfg):
    """Gradients through forward_delta reach every adapter tensor and equal autograd through the
    dense reference."""
    layer, x = make_layer(layer_name)
    spec, t = random_tensors(layer, cfg)
    trainable = [k for k in t if k != "alpha"]
    base_out = layer(x).detach()
    g_out = torch.randn(base_out.shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    ref = {k: v.clone().requires_grad_(k in trainable) for k, v in t.items()}
    y = layer_with_weight(layer, x, layer.weight.detach() + dense_reference(ref, tuple(layer.weight.shape)))
    ((y - base_out) * g_out).sum().backward()
    ours = {k: v.clone().requires_grad_(k in trainable) for k, v in t.items()}
    (LOKR.forward_delta(x, ours, spec, layer.weight, layer.bias, base_out) * g_out).sum().backward()
    for k in trainable:
        assert ours[k].grad is not None, k
        assert ours[k].grad.abs().max() > 0, k
        torch.testing.assert_close(ours[k].grad, ref[k].grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 1e5, 0.5])
def test_both_full_ignores_alpha(alpha):
    layer, _ = make_layer("conv2d_3x3")
    spec, t = random_tensors(layer, CONFIGS[9])
    assert "lokr_w1" in t and "lokr_w2" in t
    t["alpha"] = torch.tensor(alpha, dtype=F64)
    assert LOKR.scale(t) == 1.0 and LOKR.rank(t) is None
    w1, w2 = t["lokr_w1"], t["lokr_w2"]
    expected = torch.einsum("ij,kn...->ikjn...", w1, w2).reshape(layer.weight.shape)
    torch.testing.assert_close(LOKR.delta_weight(t, spec), expected, **TOL)


def test_rank_and_scale_source():
    spec = LayerSpec("linear", (48, 36))
    t = LOKR.create(spec, opts_for((2, -1, True, False, False, False, False, False)))
    assert LOKR.rank(t) == t["lokr_w2_b"].shape[0] == 2
    assert LOKR.scale(t) == pytest.approx(ALPHA / 2)
    t = LOKR.create(spec, opts_for((3, -1, True, False, True, False, False, False)))
    assert "lokr_w2" in t and LOKR.rank(t) == t["lokr_w1_b"].shape[0] == 3
    assert LOKR.scale(t) == pytest.approx(ALPHA / 3)


# -- creation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_create_zero_start_and_alpha(layer_name, cfg):
    rank, *_, scalar, rs = cfg
    layer, _ = make_layer(layer_name)
    spec = LayerSpec.from_module(layer)
    t = LOKR.create(spec, opts_for(cfg))
    assert all(v.dtype == torch.float32 for v in t.values())
    assert torch.count_nonzero(LOKR.delta_weight(t, spec)) == 0
    zero_side = "lokr_w2" if "lokr_w2" in t else "lokr_w2_b"
    if scalar:
        assert float(t["scalar"]) == 0 and torch.count_nonzero(t[zero_side]) > 0
    else:
        assert "scalar" not in t and torch.count_nonzero(t[zero_side]) == 0
    both_full = "lokr_w1" in t and "lokr_w2" in t
    if both_full:
        assert float(t["alpha"]) == rank and LOKR.scale(t) == 1.0
    else:
        assert float(t["alpha"]) == pytest.approx(ALPHA * math.sqrt(rank) if rs else ALPHA)
        assert LOKR.scale(t) == pytest.approx(ALPHA / math.sqrt(rank) if rs else ALPHA / rank)


def test_create_honours_generator():
    spec = LayerSpec.from_module(nn.Conv2d(24, 36, 3))
    opts = opts_for((2, -1, True, False, False, True, True, False))
    a = LOKR.create(spec, opts, generator=torch.Generator().manual_seed(3))
    b = LOKR.create(spec, opts, generator=torch.Generator().manual_seed(3))
    c = LOKR.create(spec, opts, generator=torch.Generator().manual_seed(4))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not torch.equal(a["lokr_w1_a"], c["lokr_w1_a"])


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[5], CONFIGS[10], CONFIGS[12]],
                         ids=[CONFIG_IDS[i] for i in (1, 5, 10, 12)])
@pytest.mark.parametrize("layer_name", ["linear", "conv2d_3x3"])
def test_create_distribution_matches_lycoris_module(layer_name, cfg):
    """Same seed on the global RNG → the same tensors as LyCORIS's LokrModule (same draw order,
    same kaiming-uniform bounds)."""
    layer, _ = make_layer(layer_name)
    layer = layer.float()
    torch.manual_seed(11)
    ly = lycoris_params(layer, cfg)
    torch.manual_seed(11)
    t = LOKR.create(LayerSpec.from_module(layer), opts_for(cfg))
    params = dict(ly.named_parameters())
    for k, v in t.items():
        if k not in ("alpha", "scalar"):
            torch.testing.assert_close(v, params[k].detach(), rtol=0, atol=0, msg=k)


# -- export -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [CONFIGS[5], CONFIGS[10]], ids=[CONFIG_IDS[5], CONFIG_IDS[10]])
def test_export_folds_scalar_into_w1(cfg):
    layer, _ = make_layer("conv2d_3x3")
    spec, t = random_tensors(layer, cfg)
    key = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
    out = LOKR.export(t)
    assert "scalar" not in out
    torch.testing.assert_close(out[key], t[key] * t["scalar"], **TOL)
    for k in t:
        if k not in ("scalar", key):
            assert torch.equal(out[k], t[k])
    torch.testing.assert_close(LOKR.delta_weight(out, spec), dense_reference(t, tuple(layer.weight.shape)), **TOL)


# -- parity with lycoris-lora 4.1.3 -----------------------------------------------------------

def lycoris_module(layer, t, cfg, bypass):
    ly = lycoris_params(layer, cfg, bypass=bypass).to(F64)
    with torch.no_grad():
        for name, p in ly.named_parameters():
            p.copy_(t[name])
    return ly


# LyCORIS's forward ignores padding_mode (it calls F.conv2d with the padding only), so the
# reflect-padded layer is left out of the parity comparison (it is covered by the dense tests).
PARITY_LAYERS = [n for n in LAYERS if n != "conv2d_reflect"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layer_name", PARITY_LAYERS)
def test_forward_parity_with_lycoris(layer_name, cfg):
    """LyCORIS's forward (rebuild mode, and bypass mode) minus the base output == our Δy."""
    rank, *_, rs = cfg
    layer, x = make_layer(layer_name)
    spec, t = random_tensors(layer, cfg)
    both_full = "lokr_w1" in t and "lokr_w2" in t
    # Deliberate difference: with both factors full and rs_lora, LyCORIS's own forward scales by
    # √r (alpha forced to r, divided by √r) while every loader reads γ = 1; we use γ = 1.
    ly_factor = math.sqrt(rank) if (both_full and rs) else 1.0
    # Its bypass path runs W2 as a conv with the layer's groups on the in_m-folded input, which
    # is wrong for grouped convs; only its rebuild path is compared there.
    modes = (False,) if layer_name == "conv2d_grouped" else (False, True)
    with torch.no_grad():
        base_out = layer(x)
        ours = LOKR.forward_delta(x, t, spec, layer.weight, layer.bias, base_out)
        for bypass in modes:
            ly_delta = lycoris_module(layer, t, cfg, bypass)(x) - base_out
            assert ly_delta.abs().max() > 0
            # rtol 1e-7: our alpha is an fp32 tensor (as in files); LyCORIS keeps α/√r as a float
            torch.testing.assert_close(ours * ly_factor, ly_delta, rtol=1e-7, atol=1e-10,
                                       msg=lambda m: f"bypass={bypass}: {m}")


@pytest.mark.parametrize("layer_name,cfg", [("conv2d_3x3", CONFIGS[0]), ("conv2d_3x3", CONFIGS[4]),
                                            ("linear", CONFIGS[12])], ids=["plain", "tucker", "w1-decomposed"])
def test_lycoris_merge_applies_gamma_twice(layer_name, cfg):
    """Documents LyCORIS's bug that we do not copy: get_diff_weight (its merge) = γ · forward ΔW."""
    layer, x = make_layer(layer_name)
    spec, t = random_tensors(layer, cfg)
    ly = lycoris_module(layer, t, cfg, bypass=False)
    with torch.no_grad():
        ly_merge_dw = ly.get_diff_weight(1.0, shape=ly.shape)[0]
        ours = LOKR.delta_weight(t, spec)
        gamma = LOKR.scale(t)
        assert gamma != pytest.approx(1.0)
        torch.testing.assert_close(ly_merge_dw, gamma * ours, rtol=1e-7, atol=1e-10)
        assert not torch.allclose(ly_merge_dw, ours)
        torch.testing.assert_close(ly(x) - layer(x), layer_with_weight(layer, x, ours, zero_bias=True),
                                   rtol=1e-7, atol=1e-10)

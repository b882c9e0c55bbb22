"""Diag-OFT and BOFT against dense float64 references and against LyCORIS 4.1.3's merge path."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
from lycoris.modules.boft import ButterflyOFTModule
from lycoris.modules.diag_oft import DiagOFTModule

from lyco.algorithms import detect, get
from lyco.algorithms.base import LayerSpec, layer_op
from lyco.errors import ConfigError

logging.getLogger("LyCORIS").setLevel(logging.WARNING)

M = 0.7
OUT = 16


def _layer(case: str) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    layer, shape = {
        "linear_bias": (nn.Linear(6, OUT), (3, 5, 6)),
        "linear_nobias": (nn.Linear(6, OUT, bias=False), (4, 6)),
        "conv1d": (nn.Conv1d(3, OUT, 3, padding=1), (2, 3, 7)),
        "conv2d_1x1": (nn.Conv2d(4, OUT, 1), (2, 4, 5, 5)),
        "conv2d_3x3": (nn.Conv2d(3, OUT, 3, stride=2, padding=1), (2, 3, 7, 7)),
        "conv3d": (nn.Conv3d(2, OUT, 3, padding=1), (1, 2, 4, 4, 4)),
    }[case]
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer, torch.randn(shape, generator=g)


CASES = ["linear_bias", "linear_nobias", "conv1d", "conv2d_1x1", "conv2d_3x3", "conv3d"]


# ---------------------------------------------------------------------------------------
# Independent dense references (float64, explicit matrices)
# ---------------------------------------------------------------------------------------

def ref_rotations(blocks: torch.Tensor, kappa: float | None) -> torch.Tensor:
    b = blocks.double()
    q = b - b.transpose(-1, -2)
    n = torch.sqrt((q * q).sum()) + 1e-8
    if kappa is not None and kappa > 0 and n > kappa:
        q = q * (kappa / n)
    eye = torch.eye(b.shape[-1], dtype=torch.float64)
    return (eye + q) @ torch.linalg.inv(eye - q)


def ref_diag_merged(w, blocks, rescale, kappa, m):
    """Dense: W' = W + m·(rescale ⊙ (blockdiag(R)ᵀ W) − W)."""
    r = ref_rotations(blocks, kappa)
    big = torch.block_diag(*r)
    wf = w.double().reshape(w.shape[0], -1)
    wp = big.T @ wf
    if rescale is not None:
        wp = rescale.double().reshape(-1, 1) * wp
    return (wf + m * (wp - wf)).reshape(w.shape)


def butterfly_matrix(out: int, b: int, stage: int) -> torch.Tensor:
    """P with (P v)[p] = v[src]: channels regrouped so that each stage block is contiguous."""
    k = 2 ** stage * b // 2
    p_mat = torch.zeros(out, out, dtype=torch.float64)
    for c in range(out // (2 * k)):
        for kk in range(k):
            for g in range(2):
                p_mat[c * 2 * k + kk * 2 + g, c * 2 * k + g * k + kk] = 1.0
    return p_mat


def ref_boft_merged(w, blocks, rescale, kappa, m):
    """Dense: W' = rescale_m ⊙ (S_{M-1} … S_0 W), S_i = Pᵢᵀ blockdiag(I + m(R_i − I)) Pᵢ."""
    r = ref_rotations(blocks, kappa)
    stages, nb, b, _ = r.shape
    out = nb * b
    eye = torch.eye(b, dtype=torch.float64)
    total = torch.eye(out, dtype=torch.float64)
    for i in range(stages):
        p = butterfly_matrix(out, b, i)
        s = p.T @ torch.block_diag(*[eye + m * (r[i, d] - eye) for d in range(nb)]) @ p
        total = s @ total
    wf = w.double().reshape(out, -1)
    wp = total @ wf
    if rescale is not None:
        wp = (1 + m * (rescale.double().reshape(-1, 1) - 1)) * wp
    return wp.reshape(w.shape)


def _tensors(kind: str, spec: LayerSpec, constraint: float, rescaled: bool, seed: int, rank: int = 4):
    g = torch.Generator().manual_seed(seed)
    alg = get(kind)
    t = alg.create(spec, alg.validate_options({"rank": rank, "constraint": constraint, "rescaled": rescaled}))
    t["oft_blocks"] = torch.randn(t["oft_blocks"].shape, generator=g) * 0.3
    if rescaled:
        t["rescale"] = 1 + 0.3 * torch.randn(t["rescale"].shape, generator=g)
    return t


def _kappa(t):
    """LyCORIS's κ = constraint·out, from the alpha tensor as stored (fp32)."""
    c = float(t["alpha"])
    return c * OUT if c > 0 else None


# (constraint, rescaled): unconstrained, constraint that binds, constraint that does not bind
VARIANTS = [(0.0, False), (0.02, True), (0.02, False), (5.0, True)]


def _check_binding(t, constraint):
    b = t["oft_blocks"].double()
    n = torch.linalg.vector_norm(b - b.transpose(-1, -2))
    if constraint == 0.02:
        assert n > constraint * OUT  # the constraint really binds in this variant
    elif constraint == 5.0:
        assert n < constraint * OUT


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("constraint,rescaled", VARIANTS)
def test_diag_oft_dense_and_forward(case, constraint, rescaled):
    layer, x = _layer(case)
    layer = layer.double()
    x = x.double()
    spec = LayerSpec.from_module(layer)
    alg = get("diag-oft")
    t = {k: (v.double() if v.is_floating_point() else v) for k, v in
         _tensors("diag-oft", spec, constraint, rescaled, seed=1).items()}
    _check_binding(t, constraint)
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    ref1 = ref_diag_merged(w, t["oft_blocks"], t.get("rescale"), _kappa(t), 1.0)
    torch.testing.assert_close(alg.delta_weight(t, spec, w), ref1 - w, rtol=1e-10, atol=1e-10)
    w2, b2 = alg.merged(t, spec, w, b, M)
    torch.testing.assert_close(w2, ref_diag_merged(w, t["oft_blocks"], t.get("rescale"), _kappa(t), M),
                               rtol=1e-10, atol=1e-10)
    assert b2 is b  # the bias is never rotated
    # (b) structured forward == op with the merged weight
    base = layer(x)
    got = base + M * alg.forward_delta(x, t, spec, w, b, base)
    torch.testing.assert_close(got, layer_op(x, spec, w2, b2), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(alg.forward_delta(x, t, spec, w, b, base, multiplier=M),
                               M * alg.forward_delta(x, t, spec, w, b, base), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("constraint,rescaled", VARIANTS)
def test_boft_dense_and_forward(case, constraint, rescaled):
    # block size 2 (8 blocks, 4 stages) on half the layers, 4 (4 blocks, 3 stages) on the others
    rank = 2 if case in ("linear_nobias", "conv1d", "conv3d") else 4
    layer, x = _layer(case)
    layer = layer.double()
    x = x.double()
    spec = LayerSpec.from_module(layer)
    alg = get("boft")
    t = {k: (v.double() if v.is_floating_point() else v) for k, v in
         _tensors("boft", spec, constraint, rescaled, seed=2, rank=rank).items()}
    assert t["oft_blocks"].shape[0] >= 3  # several butterfly stages
    _check_binding(t, constraint)
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    for m in (1.0, M):
        ref = ref_boft_merged(w, t["oft_blocks"], t.get("rescale"), _kappa(t), m)
        w2, b2 = alg.merged(t, spec, w, b, m)
        torch.testing.assert_close(w2, ref, rtol=1e-10, atol=1e-10)
        assert b2 is b
        base = layer(x)
        got = base + alg.forward_delta(x, t, spec, w, b, base, multiplier=m)
        torch.testing.assert_close(got, layer_op(x, spec, w2, b2), rtol=1e-9, atol=1e-9)
    ref1 = ref_boft_merged(w, t["oft_blocks"], t.get("rescale"), _kappa(t), 1.0)
    torch.testing.assert_close(alg.delta_weight(t, spec, w), ref1 - w, rtol=1e-10, atol=1e-10)
    # non-linear in m: merged(0.7) is not W + 0.7·ΔW
    assert not torch.allclose(alg.merged(t, spec, w, b, M)[0], w + M * (ref1 - w), atol=1e-6)
    torch.testing.assert_close(alg.merged(t, spec, w, b, 0.0)[0], w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["diag-oft", "boft"])
@pytest.mark.parametrize("constraint", [0.0, 0.02])
def test_oft_gradients_reach_all_tensors(kind, constraint):
    layer, x = _layer("conv2d_3x3")
    spec = LayerSpec.from_module(layer)
    alg = get(kind)
    t = _tensors(kind, spec, constraint, True, seed=3)
    trainable = [k for k in t if k not in alg.frozen_keys]
    assert set(trainable) == {"oft_blocks", "rescale"}
    for k in trainable:
        t[k].requires_grad_(True)
    base = layer(x).detach()
    w = layer.weight.detach()
    g = torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    (alg.forward_delta(x, t, spec, w, layer.bias.detach(), base) * g).sum().backward()
    for k in trainable:
        assert t[k].grad is not None and t[k].grad.abs().sum() > 0, k


# ---------------------------------------------------------------------------------------
# Parity with LyCORIS 4.1.3 (its merge path), and the documented differences
# ---------------------------------------------------------------------------------------

def _lyco_module(kind, layer, t, constraint, multiplier):
    cls = DiagOFTModule if kind == "diag-oft" else ButterflyOFTModule
    mod = cls("m", layer, multiplier, lora_dim=t["oft_blocks"].shape[-1], constraint=constraint,
              rescaled="rescale" in t)
    with torch.no_grad():
        mod.oft_blocks.copy_(t["oft_blocks"])
        if "rescale" in t:
            mod.rescale.copy_(t["rescale"])
    return mod


@pytest.mark.parametrize("kind", ["diag-oft", "boft"])
@pytest.mark.parametrize("case", ["linear_bias", "conv2d_3x3", "conv1d"])
@pytest.mark.parametrize("constraint", [0.0, 0.02, 5.0])
def test_merge_matches_lycoris(kind, case, constraint):
    layer, x = _layer(case)
    spec = LayerSpec.from_module(layer)
    alg = get(kind)
    t = _tensors(kind, spec, constraint, False, seed=4)
    w, b = layer.weight.detach(), layer.bias.detach()
    for m in (1.0, M):
        mod = _lyco_module(kind, layer, t, constraint, m)
        with torch.no_grad():
            ly_w = mod.get_merged_weight(multiplier=m)[0]
            ly_y = mod(x)  # rebuild-mode forward: base + op(x, W' − W), bias untouched
            ours_w = alg.merged(t, spec, w, b, m)[0]
            base = layer(x)
            fd = alg.forward_delta(x, t, spec, w, b, base, multiplier=m)
        torch.testing.assert_close(ours_w, ly_w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(base + fd, ly_y, rtol=1e-5, atol=1e-5)
    # with a rescale, LyCORIS agrees at m = 1
    t = _tensors(kind, spec, constraint, True, seed=5)
    mod = _lyco_module(kind, layer, t, constraint, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(alg.merged(t, spec, w, b, 1.0)[0], mod.get_merged_weight(1.0)[0],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["diag-oft", "boft"])
def test_rescale_with_multiplier_differs_from_lycoris(kind):
    """LyCORIS does not interpolate `rescale` with the multiplier: at m = 0 it still returns
    rescale ⊙ W. We interpolate it, so m = 0 is the base weight (documented decision)."""
    layer, _ = _layer("linear_bias")
    spec = LayerSpec.from_module(layer)
    alg = get(kind)
    t = _tensors(kind, spec, 0.0, True, seed=6)
    w = layer.weight.detach()
    with torch.no_grad():
        ly0 = _lyco_module(kind, layer, t, 0.0, 0.0).get_merged_weight(multiplier=0.0)[0]
    torch.testing.assert_close(ly0, t["rescale"] * w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(alg.merged(t, spec, w, None, 0.0)[0], w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["diag-oft", "boft"])
@pytest.mark.parametrize("case", ["linear_bias", "conv2d_3x3"])
def test_lycoris_bypass_rotates_bias_we_do_not(kind, case):
    layer, x = _layer(case)
    spec = LayerSpec.from_module(layer)
    alg = get(kind)
    t = _tensors(kind, spec, 0.0, False, seed=7)
    w, b = layer.weight.detach(), layer.bias.detach()
    mod = _lyco_module(kind, layer, t, 0.0, 1.0)
    mod.bypass_mode = True
    with torch.no_grad():
        ly_bypass = mod(x)
        base = layer(x)
        ours = base + alg.forward_delta(x, t, spec, w, b, base)
        merged = layer_op(x, spec, *alg.merged(t, spec, w, b, 1.0))
    torch.testing.assert_close(ours, merged, rtol=1e-5, atol=1e-5)
    # LyCORIS's bypass differs by exactly the rotation of the bias: R·b − b on every position
    ref = ref_diag_merged if kind == "diag-oft" else ref_boft_merged
    rb = ref(b.reshape(-1, 1), t["oft_blocks"], None, None, 1.0).reshape(-1).float() - b
    view = (1, -1) + (1,) * (x.dim() - 2) if spec.is_conv else (-1,)
    assert rb.abs().max() > 1e-2
    torch.testing.assert_close(ly_bypass - ours, rb.reshape(view).expand_as(ours), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Constraint conventions and bake_constraint
# ---------------------------------------------------------------------------------------

def test_constraint_conventions():
    layer, _ = _layer("linear_bias")
    spec = LayerSpec.from_module(layer)
    t = _tensors("diag-oft", spec, 0.0, False, seed=8)
    t["alpha"] = torch.tensor(0.05)
    lyc, comfy = get("diag-oft"), get("diag-oft").with_convention("comfyui")
    assert get("diag-oft").convention == "lycoris"  # reading default
    torch.testing.assert_close(lyc.rotations(t).double(), ref_rotations(t["oft_blocks"], 0.05 * OUT),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(comfy.rotations(t).double(), ref_rotations(t["oft_blocks"], 0.05),
                               rtol=1e-6, atol=1e-6)
    assert not torch.allclose(lyc.rotations(t), comfy.rotations(t), atol=1e-3)
    with pytest.raises(ConfigError):
        get("boft").with_convention("kohya?")


@pytest.mark.parametrize("kind", ["diag-oft", "boft"])
@pytest.mark.parametrize("constraint", [0.0, 0.02, 5.0])
def test_bake_constraint_makes_every_convention_agree(kind, constraint):
    layer, _ = _layer("conv2d_3x3")
    spec = LayerSpec.from_module(layer)
    alg = get(kind)
    t = _tensors(kind, spec, constraint, True, seed=9)
    r_train = ref_rotations(t["oft_blocks"], _kappa(t))  # what training computed
    baked = alg.bake_constraint(t, spec)
    assert alg.export(t).keys() == baked.keys()
    torch.testing.assert_close(alg.export(t)["alpha"], baked["alpha"])
    alpha = float(baked["alpha"])
    blocks = baked["oft_blocks"]
    # LyCORIS / A1111 (κ = alpha·out), ComfyUI (κ = alpha), and no constraint at all: same R
    for kappa in (alpha * OUT, alpha, None):
        torch.testing.assert_close(ref_rotations(blocks, kappa), r_train, rtol=1e-5, atol=1e-5)
    for conv in ("lycoris", "comfyui"):
        torch.testing.assert_close(alg.with_convention(conv).rotations(baked).double(), r_train,
                                   rtol=1e-5, atol=1e-5)
    # LyCORIS loading the baked tensors (make_module_from_state_dict: constraint = alpha·out)
    cls = DiagOFTModule if kind == "diag-oft" else ButterflyOFTModule
    with torch.no_grad():
        mod = cls.make_module_from_state_dict("m", layer, blocks, baked["rescale"], baked["alpha"])
        torch.testing.assert_close(mod.get_r().double(), r_train, rtol=1e-5, atol=1e-5)
    # still true after a bf16 save: nothing clamps (‖Q‖ + 1e-8 < alpha in the stored precision)
    b16, a16 = blocks.bfloat16().double(), float(baked["alpha"].bfloat16())
    assert torch.linalg.vector_norm(b16 - b16.transpose(-1, -2)) + 1e-8 < a16
    # and baking again changes nothing
    again = alg.bake_constraint(baked, spec)
    torch.testing.assert_close(again["oft_blocks"], blocks, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Creation, detection, dtypes
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("out,rank", [(16, 4), (16, 8), (16, 2), (24, 4), (32, 16), (20, 3)])
def test_diag_create_matches_lycoris_layout(out, rank):
    layer = nn.Linear(5, out)
    spec = LayerSpec.from_module(layer)
    alg = get("diag-oft")
    t = alg.create(spec, alg.validate_options({"rank": rank, "constraint": 1e-3, "rescaled": True}))
    mod = DiagOFTModule("m", layer, 1.0, lora_dim=rank, constraint=1e-3, rescaled=True)
    assert t["oft_blocks"].shape == mod.oft_blocks.shape
    assert t["rescale"].shape == mod.rescale.shape
    assert float(t["alpha"]) == pytest.approx(1e-3)
    assert alg.delta_weight(t, spec, layer.weight.detach()).abs().max() == 0


@pytest.mark.parametrize("out,rank", [(16, 4), (16, 2), (32, 8), (24, 6)])
def test_boft_create_matches_lycoris_layout(out, rank):
    layer = nn.Conv2d(3, out, 3)
    spec = LayerSpec.from_module(layer)
    alg = get("boft")
    t = alg.create(spec, alg.validate_options({"rank": rank, "rescaled": True}))
    mod = ButterflyOFTModule("m", layer, 1.0, lora_dim=rank, rescaled=True)
    assert t["oft_blocks"].shape == mod.oft_blocks.shape
    assert t["rescale"].shape == mod.rescale.shape
    assert alg.delta_weight(t, spec, layer.weight.detach()).abs().max() == 0


def test_boft_impossible_split_raises():
    spec = LayerSpec.from_module(nn.Linear(4, 12))
    with pytest.raises(ConfigError):
        get("boft").create(spec, get("boft").validate_options({"rank": 4}))


def test_detection_by_ndim():
    assert detect({"oft_blocks": torch.zeros(4, 4, 4), "alpha": torch.tensor(0.0)}).name == "diag-oft"
    assert detect({"oft_blocks": torch.zeros(3, 4, 4, 4), "rescale": torch.ones(16, 1)}).name == "boft"
    assert get("oft") is get("diag-oft")
    assert get("boft").linear_in_multiplier is False and get("diag-oft").linear_in_multiplier is True


def test_cayley_in_fp32_for_bf16_blocks():
    layer, x = _layer("linear_bias")
    spec = LayerSpec.from_module(layer)
    alg = get("diag-oft")
    t = _tensors("diag-oft", spec, 0.0, False, seed=10)
    t16 = {"oft_blocks": t["oft_blocks"].bfloat16(), "alpha": t["alpha"].bfloat16()}
    r = alg.rotations(t16)
    assert r.dtype == torch.float32
    eye = torch.eye(r.shape[-1])
    torch.testing.assert_close(r @ r.transpose(-1, -2), eye.expand_as(r), rtol=1e-5, atol=1e-5)
    w16 = layer.weight.detach().bfloat16()
    w2 = alg.merged(t16, spec, w16, None, 1.0)[0]
    assert w2.dtype == torch.bfloat16
    ref = ref_diag_merged(w16.double(), t16["oft_blocks"].double(), None, None, 1.0)
    torch.testing.assert_close(w2.double(), ref, rtol=2e-2, atol=2e-2)


def test_shape_mismatch_is_reported():
    from lyco.errors import ShapeMismatch
    layer, _ = _layer("linear_bias")
    spec = LayerSpec.from_module(layer)
    t = {"oft_blocks": torch.randn(3, 4, 4), "alpha": torch.tensor(0.0)}
    with pytest.raises(ShapeMismatch):
        get("diag-oft").delta_weight(t, spec, layer.weight.detach())

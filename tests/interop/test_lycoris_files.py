"""The file format is the contract: LyCORIS 4.1.3 files load in lyco with the same forward, and
lyco files load in LyCORIS 4.1.3 with the same (un-merged) forward — every algorithm, on tiny
SD1/SDXL models (UNet + CLIP) and on a plain torch module (generic ``lycoris_`` prefix).

Every adapter parameter is randomised (LyCORIS and lyco both start some factors at zero), and
each comparison also checks that the adapter visibly changes every output.

Where LyCORIS has a known bug, the reference is what the *file means* — the dense computation
ComfyUI/A1111 apply — written out here independently, and the LyCORIS discrepancy is asserted in
its own test (``test_lycoris_bug_*``) so the decision stays visible.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lyco
from lyco import naming as lyco_naming, network as lyco_network
from lyco.formats import kohya as lyco_kohya
from lyco.errors import FamilyMismatch, ShapeMismatch

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _te_arg(ix, comps):
    tes = [ix.te_view(comps[k]) for k in ("text_encoder", "text_encoder_2") if k in comps]
    return tes if len(tes) > 1 else tes[0]


def _te_only(lyc, name="attn-mlp", **changes):
    """A kohya preset that targets the text encoder only (cheap: the bug tests need no UNet)."""
    return lyc.kohya_preset(name, unet_target_module=[], unet_target_name=[], **changes)


def _file_keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def _module_keys(path) -> set[str]:
    return {k.partition(".")[0] for k in _file_keys(path)}


_DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def lycoris_to_lyco(model, lyc, ix, path, algo, *, m=1.0, dtype=torch.float32, ldm=False, te_views=True,
                    seed=0, **kw):
    """LyCORIS writes a file (after randomising its network); lyco reads and attaches it.

    Returns (LyCORIS outputs, lyco outputs, the Adapter, the LyCORIS network)."""
    comps = model.clone()
    unet = ix.ldm_view(comps["unet"], model.family) if ldm else None
    net = lyc.create_network(comps, algo, multiplier=m, unet=unet, te_views=te_views, **kw)
    assert ix.randomise_(net.named_parameters(), seed) > 0
    if dtype != torch.float32:  # the reference runs on what the file will hold
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(p.to(dtype).float())
    ref = model.run(comps)
    net.save_weights(str(path), dtype, {})
    adapter = lyco.load(path)
    with adapter.attach(model.comps, multiplier=m) as handle:
        handle.eval()
        got = model.run()
        assert not handle.unmatched
        assert len(handle.layers) == len(net.loras) == len(adapter)
    return ref, got, adapter, net


def lyco_to_lycoris(model, lyc, ix, path, algo, *, m=1.0, naming="auto", preset="full", loader="weights",
                    lycoris_kw=None, seed=0, dtype=torch.float32, **opts):
    """lyco writes a file (after randomising); LyCORIS reads it and runs its un-merged forward.

    ``loader="weights"``: ``create_network_from_weights`` (what inference tools call);
    ``loader="resume"``: ``create_network`` + ``load_weights`` (kohya's resume path).
    Returns (LyCORIS outputs, lyco outputs, the lyco Network's layer count, the LyCORIS network)."""
    net = lyco.create(model.comps, algo, preset=preset, **opts)
    try:
        assert ix.lyco_randomise_(net, seed) > 0
        if dtype != torch.float32:  # lyco's own forward runs on what the file will hold
            with torch.no_grad():
                for p in net.parameters():
                    p.copy_(p.to(dtype).float())
        net.eval()
        net.set_multiplier(m)
        got = model.run()
        net.save(path, naming=naming, dtype=_DTYPE_NAME[dtype])
        n_layers = len(net.layers)
    finally:
        net.detach()
    comps = model.clone()
    te = _te_arg(ix, comps)
    ldm = any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)", k) for k in _module_keys(path))
    unet = ix.ldm_view(comps["unet"], model.family) if ldm else comps["unet"]
    if loader == "weights":
        lnet, _ = lyc.from_weights(m, path, te, unet)
    else:
        lnet = lyc.create_network(comps, algo, multiplier=m, unet=unet if ldm else None, **(lycoris_kw or {}))
        info = lnet.load_weights(str(path))
        assert not info, info  # neither missing nor unexpected keys
    lnet.eval()
    ref = model.run(comps)
    assert len(lnet.loras) == n_layers
    return ref, got, n_layers, lnet


def module_index(ix, comps) -> dict[str, torch.nn.Module]:
    """File module key → layer, by the kohya rule (``prefix_`` + dotted path with ``.``→``_``),
    independently of lyco's naming code."""
    idx = {}
    for path, mod in comps["unet"].named_modules():
        idx["lora_unet_" + path.replace(".", "_")] = mod
    tes = [k for k in ("text_encoder", "text_encoder_2") if k in comps]
    for i, k in enumerate(tes):
        prefix = "lora_te" if len(tes) == 1 else f"lora_te{i + 1}"
        for path, mod in ix.te_view(comps[k]).named_modules():
            idx[f"{prefix}_{path}".replace(".", "_")] = mod
    return idx


def dense_lora_delta(t: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """ΔW a LoRA-family module *means* (ComfyUI/A1111): γ·up₂ᴰ@down₂ᴰ, γ = alpha/rank (no Tucker)."""
    up, down = t["lora_up.weight"].double(), t["lora_down.weight"].double()
    r = down.shape[0]
    gamma = float(t["alpha"]) / r if "alpha" in t else 1.0
    return (gamma * up.reshape(up.shape[0], -1) @ down.reshape(r, -1)).reshape(weight.shape)


def dense_dora(weight: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, m: float) -> torch.Tensor:
    """ComfyUI/A1111 DoRA at strength m: W + m·(DoRA(W + ΔW) − W); the norm axis from the shape."""
    wc = weight.double() + delta
    if scale.shape[0] == weight.shape[0] and scale.numel() == weight.shape[0]:
        n = wc.reshape(wc.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (wc.dim() - 1))
    else:
        n = wc.transpose(0, 1).reshape(wc.shape[1], -1).norm(dim=1).reshape((1, -1) + (1,) * (wc.dim() - 2))
    wd = wc * (scale.double().reshape(n.shape) / n)
    return weight.double() + m * (wd - weight.double())


def dense_oft_weight(t: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """W' a Diag-OFT module means, unconstrained (alpha = 0): per block of b output rows
    W'[k·b+j] = Σ_n R_k[n, j]·W[k·b+n] with R = (I+Q)(I−Q)⁻¹, Q = B − Bᵀ; then rescale ⊙ W'."""
    assert float(t["alpha"]) == 0.0
    b = t["oft_blocks"].double()
    nb, bs, _ = b.shape
    q = b - b.transpose(1, 2)
    eye = torch.eye(bs, dtype=torch.float64)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    w = weight.double().reshape((nb, bs) + tuple(weight.shape[1:]))
    out = torch.einsum("knm,kn...->km...", r, w).reshape(weight.shape)
    if "rescale" in t:
        out = out * t["rescale"].double().reshape((-1,) + (1,) * (weight.dim() - 1))
    return out


@torch.no_grad()
def merge_file_dense(ix, comps, path, m: float) -> int:
    """Bake a LoRA/DyLoRA(/DoRA) or unconstrained Diag-OFT file into ``comps`` with the dense
    oracles above (what ComfyUI/A1111 compute), at strength ``m``."""
    sd = load_file(str(path))
    by_module: dict[str, dict] = {}
    for k, v in sd.items():
        mk, _, suffix = k.partition(".")
        by_module.setdefault(mk, {})[suffix] = v.float()
    idx = module_index(ix, comps)
    for mk, t in by_module.items():
        mod = idx[mk]
        w = mod.weight
        if "oft_blocks" in t:
            new = w.double() + m * (dense_oft_weight(t, w) - w.double())
        else:
            d = dense_lora_delta(t, w)
            new = dense_dora(w, d, t["dora_scale"], m) if "dora_scale" in t else w.double() + m * d
        w.copy_(new.to(w.dtype))
    return len(by_module)


# --------------------------------------------------------------------------------------
# 1. LyCORIS → lyco, every algorithm (SD1 UNet + CLIP, preset "full")
# --------------------------------------------------------------------------------------

_TUCKER_RESNETS = {"ResnetBlock2D": {"use_tucker": True}}

#: id → (algo, multiplier, create_network kwargs, module_algo_map of the preset). Per-class
#: entries of the map vary the options (or the algorithm) inside one network, so each file
#: covers several variants at the cost of one model pass.
LYCORIS_CASES = {
    # LoCon with rs-LoRA; Tucker cores on the ResNet 3×3 convs, plain LoCon on the samplers/conv_in/out
    "lora": ("lora", 0.7, dict(dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0, rs_lora=True), _TUCKER_RESNETS),
    # LoHa with the scalar folded into hada_w1_a; Tucker on the ResNets
    "loha": ("loha", 0.7, dict(dim=2, alpha=1.0, use_scalar=True), _TUCKER_RESNETS),
    # LoKr: factor 4 (UNet default), factor 2 + Tucker (ResNets), decompose_both (CLIP attention),
    # full_matrix (CLIP MLP, both factors full: γ = 1 whatever alpha says)
    "lokr": ("lokr", 0.7, dict(dim=2, alpha=1.0, factor=4), {
        "ResnetBlock2D": {"use_tucker": True, "factor": 2},
        "CLIPAttention": {"decompose_both": True, "factor": -1, "dim": 1, "alpha": 0.5},
        "CLIPMLP": {"full_matrix": True}}),
    # (IA)³ on the output axis, and on the input axis for the CLIP MLPs; with, at multiplier 1
    # (where LyCORIS's rescale semantics agree with the loaders, see the bug test), Diag-OFT
    # (ResNets) and BOFT (samplers) with ``rescale`` and no constraint
    "ia3-oft-rescaled": ("ia3", 1.0, dict(rescaled=True), {
        "CLIPMLP": {"train_on_input": True}, "ResnetBlock2D": {"algo": "diag-oft", "dim": 4},
        "Downsample2D": {"algo": "boft", "dim": 2}, "Upsample2D": {"algo": "boft", "dim": 2}}),
    # GLoRA (transformer blocks, conv_in/out, time embedding, CLIP) and Full (ResNets, samplers),
    # written from the LDM-named view of the UNet (A1111-style SD1 names, upsampler at output_blocks_2_1_conv)
    "glora-full": ("glora", 0.7, dict(dim=2, alpha=1.0), {
        c: {"algo": "full"} for c in ("ResnetBlock2D", "Downsample2D", "Upsample2D")}),
    # Diag-OFT (UNet transformers, CLIP attention) and BOFT (ResNets, samplers, CLIP MLP), κ =
    # constraint·out with the clamp active (checked below), multiplier ≠ 1 (BOFT: per stage)
    "oft": ("diag-oft", 0.7, dict(dim=4, constraint=0.01), {
        "ResnetBlock2D": {"algo": "boft", "dim": 2}, "Downsample2D": {"algo": "boft", "dim": 2},
        "Upsample2D": {"algo": "boft", "dim": 2}, "CLIPMLP": {"algo": "boft", "dim": 2}}),
    # DoRA on LoRA, LoHa and LoKr, each with the magnitude on the output axis (LyCORIS's default)
    # and on the input axis (legacy, what A1111 assumes); multiplier 1 (see the bug test for m ≠ 1)
    "dora": ("lora", 1.0, dict(dim=4, alpha=2.0, dora_wd=True, wd_on_output=True), {
        "ResnetBlock2D": {"algo": "loha", "dim": 2, "use_tucker": True},
        "Upsample2D": {"algo": "loha", "dim": 2, "wd_on_out": False},
        "Downsample2D": {"algo": "lokr", "dim": 2, "factor": 2, "wd_on_out": False},
        "CLIPAttention": {"wd_on_out": False}, "CLIPMLP": {"algo": "lokr", "factor": 4}}),
}

#: cases LyCORIS writes from the LDM-named view of the SD1 UNet
_LYCORIS_LDM = {"glora-full"}

#: cases whose file is written in half precision (the reference then runs on the rounded values)
_LYCORIS_DTYPE = {"loha": torch.float16, "lokr": torch.bfloat16}

#: what each case's file must contain (algorithm families as lyco names them)
_CASE_ALGOS = {"glora-full": {"glora", "full"}, "oft": {"diag-oft", "boft"},
               "ia3-oft-rescaled": {"ia3", "diag-oft", "boft"}, "dora": {"lora+dora", "loha+dora", "lokr+dora"}}


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_lycoris_file_loads_in_lyco_sd1(case, sd1, lyc, ix, tmp_path):
    algo, m, kw, algo_map = LYCORIS_CASES[case]
    dtype = _LYCORIS_DTYPE.get(case, torch.float32)
    preset = lyc.kohya_preset("full", module_algo_map=algo_map)
    f = tmp_path / f"{case}.safetensors"
    ldm = case in _LYCORIS_LDM
    ref, got, adapter, net = lycoris_to_lyco(sd1, lyc, ix, f, algo, m=m, dtype=dtype, preset=preset, ldm=ldm, **kw)
    assert {t.dtype for t in load_file(str(f)).values() if t.is_floating_point()} == {dtype}
    ix.assert_outputs_close(got, ref, sd1.base, dtype=dtype, what=case)
    keys = _module_keys(f)
    if ldm:
        assert {"lora_unet_output_blocks_2_1_conv", "lora_unet_input_blocks_3_0_op",
                "lora_unet_input_blocks_1_0_in_layers_2"} <= keys
        assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
        assert "unet.up_blocks.0.upsamplers.0.conv" in adapter.modules
    else:
        assert "lora_unet_up_blocks_0_upsamplers_0_conv" in keys
    assert set(adapter.algos()) == _CASE_ALGOS.get(case, {algo})
    if case == "oft":
        # the constraint must actually bite, or this case proves nothing about κ = alpha·out
        clamped = 0
        for ma in adapter.modules.values():
            b = ma.tensors["oft_blocks"].double()
            out_dim = b.shape[-3] * b.shape[-1]
            clamped += float((b - b.transpose(-1, -2)).norm()) > float(ma.tensors["alpha"]) * out_dim
        assert clamped > len(adapter) // 2
    if case == "dora":  # every algorithm with both magnitude axes
        axes = {(ma.algo, ma.tensors["dora_scale"].shape[0] == 1) for ma in adapter.modules.values()}
        assert axes == {(a, in_axis) for a in ("lora", "loha", "lokr") for in_axis in (True, False)}
    if case == "ia3-oft-rescaled":
        assert all("rescale" in ma.tensors for ma in adapter.modules.values() if ma.algo in ("diag-oft", "boft"))
        assert {bool(ma.tensors["on_input"]) for ma in adapter.modules.values() if ma.algo == "ia3"} == {True, False}
    if case == "lokr":
        keys = _file_keys(f)
        assert any(k.endswith("lokr_t2") for k in keys) and any(k.endswith("lokr_w1_a") for k in keys)
        assert any(k.startswith("lora_te_") and k.endswith("lokr_w2") for k in keys)


@pytest.mark.parametrize("ldm", [False, True], ids=["diffusers-names", "ldm-names"])
def test_lycoris_file_loads_in_lyco_sdxl(ldm, sdxl, lyc, ix, tmp_path):
    """SDXL: two text encoders (``lora_te1_``/``lora_te2_``), UNet named the diffusers way or the
    kohya SDXL (LDM/SGM) way."""
    f = tmp_path / "sdxl.safetensors"
    algo_map = {"ResnetBlock2D": {"algo": "loha", "dim": 2}, "CLIPMLP": {"algo": "lokr", "factor": 4}}
    ref, got, adapter, _ = lycoris_to_lyco(sdxl, lyc, ix, f, "lora", m=0.8, ldm=ldm, dim=4, alpha=2.0,
                                           preset=lyc.kohya_preset("full", module_algo_map=algo_map))
    keys = _module_keys(f)
    assert {k.split("_text_model")[0] for k in keys if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    if ldm:
        assert "lora_unet_output_blocks_2_2_conv" in keys and "lora_unet_middle_block_1_proj_in" in keys
    else:
        assert "lora_unet_up_blocks_0_upsamplers_0_conv" in keys
    ix.assert_outputs_close(got, ref, sdxl.base, what=f"sdxl ldm={ldm}")
    assert adapter.family == "sdxl" and set(adapter.algos()) == {"lora", "loha", "lokr"}
    assert "unet.up_blocks.0.upsamplers.0.conv" in adapter.modules


def test_lycoris_file_with_transformers5_te_names_loads_in_lyco(sd1, lyc, ix, tmp_path):
    """LyCORIS walking a transformers-5 CLIPTextModel (no ``text_model`` level) writes
    ``lora_te_encoder_layers_…`` — keys A1111/ComfyUI do not map. lyco still reads them."""
    f = tmp_path / "t5names.safetensors"
    ref, got, adapter, _ = lycoris_to_lyco(sd1, lyc, ix, f, "lora", m=1.0, te_views=False, dim=4, alpha=4.0,
                                           preset=_te_only(lyc))
    te_keys = _module_keys(f)
    assert te_keys and all(k.startswith("lora_te_encoder_layers_") for k in te_keys)
    ix.assert_outputs_close(got, ref, sd1.base, what="te without text_model", keys=ix.TE_KEYS)
    assert len(adapter) == len(te_keys)
    assert all(n.startswith("text_encoder.text_model.encoder.layers.") for n in adapter.modules)
    # lyco names them canonically, so writing the adapter back gives the ecosystem's names
    written = {k.partition(".")[0] for k in lyco_kohya.to_state_dict(adapter)}
    assert {k for k in written if k.startswith("lora_te")} == {
        k.replace("lora_te_", "lora_te_text_model_") for k in te_keys}


# --------------------------------------------------------------------------------------
# 1b. where LyCORIS's own behaviour is not what its file means
# --------------------------------------------------------------------------------------


def test_lycoris_bug_dylora_file_means_plain_lora(sd1, lyc, ix, tmp_path):
    """LyCORIS DyLoRA: its forward samples a random rank with scale α/(block+1), and its file is a
    LoRA with a 2-D ``lora_up`` even for convs. The file means γ = alpha/rank over the whole rank
    (ComfyUI/A1111); lyco applies exactly that. LyCORIS itself cannot reload the file; re-saved
    by lyco, it can."""
    f = tmp_path / "dylora.safetensors"
    comps = sd1.clone()
    preset = lyc.kohya_preset("full", unet_target_module=["Downsample2D", "Upsample2D"])
    net = lyc.create_network(comps, "dylora", multiplier=0.6, dim=4, alpha=2.0, block_size=2, preset=preset)
    ix.randomise_(net.named_parameters())
    net.save_weights(str(f), torch.float32, {})
    sd = load_file(str(f))
    assert sd["lora_unet_conv_in.lora_up.weight"].dim() == 2  # (out, r) for a conv layer
    assert sd["lora_unet_conv_in.lora_down.weight"].dim() == 4
    oracle = sd1.clone()
    assert merge_file_dense(ix, oracle, f, 0.6) == len(net.loras)
    ref = sd1.run(oracle)
    with lyco.load(f).attach(sd1.comps, multiplier=0.6) as h:
        h.eval()
        got = sd1.run()
    ix.assert_outputs_close(got, ref, sd1.base, what="dylora")
    # the discrepancy: LyCORIS's loader reads it as LoCon and fails on the 2-D conv up
    with pytest.raises(RuntimeError):
        lyc.from_weights(1.0, f, _te_arg(ix, comps), comps["unet"], apply=False)
    # lyco reads the conv up factors in the usual (out, r, 1, 1) layout, so re-saving the adapter
    # gives a plain LoRA file that LyCORIS itself loads, with the same forward
    adapter = lyco.load(f)
    assert adapter.modules["unet.conv_in"].tensors["lora_up.weight"].dim() == 4
    f2 = tmp_path / "dylora-resaved.safetensors"
    adapter.save(f2)
    again = sd1.clone()
    lyc.from_weights(0.6, f2, _te_arg(ix, again), again["unet"])
    ix.assert_outputs_close(got, sd1.run(again), sd1.base, what="dylora re-saved by lyco, read by LyCORIS")


def test_lycoris_bug_dora_multiplier(sd1, lyc, ix, tmp_path):
    """DoRA at multiplier m ≠ 1: LyCORIS interpolates only the norm factor, W_c·(m(s/n − 1) + 1)
    (at m = 0 that is W + γΔW, not W); ComfyUI/A1111 apply W + m·(DoRA(W + γΔW) − W). lyco follows
    the loaders. Both agree at m = 1 (covered above)."""
    m = 0.4
    f = tmp_path / "dora.safetensors"
    ref_lycoris, got, adapter, _ = lycoris_to_lyco(sd1, lyc, ix, f, "lora", m=m, preset=_te_only(lyc), dim=4,
                                                   alpha=2.0, dora_wd=True)
    oracle = sd1.clone()
    merge_file_dense(ix, oracle, f, m)
    ix.assert_outputs_close(got, sd1.run(oracle), sd1.base, what="dora vs loaders", keys=ix.TE_KEYS)
    assert ix.max_rel_diff(got, ref_lycoris) > 0.01  # LyCORIS's own forward differs


def test_lycoris_bug_loha_lokr_merge_applies_gamma_twice(sd1, lyc, ix, tmp_path):
    """LoHa and LoKr files with γ = α/r ≠ 1: LyCORIS's forward applies γ once, its merge (the
    path of its tools/merge.py: make_module + merge_to) applies γ². The file means γ (ComfyUI,
    A1111); lyco's merge equals LyCORIS's forward, and LyCORIS's merged ΔW is exactly γ times
    lyco's on every module."""
    f = tmp_path / "gamma.safetensors"
    preset = _te_only(lyc, module_algo_map={"CLIPMLP": {"algo": "lokr", "dim": 1, "alpha": 0.5, "factor": 4}})
    ref_fwd, got, adapter, _ = lycoris_to_lyco(sd1, lyc, ix, f, "loha", m=1.0, preset=preset, dim=4, alpha=1.0)
    assert set(adapter.algos()) == {"loha", "lokr"}
    ix.assert_outputs_close(got, ref_fwd, sd1.base, what="forward", keys=ix.TE_KEYS)
    merged = sd1.clone()
    lnet, sd = lyc.from_weights(1.0, f, _te_arg(ix, merged), merged["unet"], apply=False)
    lnet.merge_to(_te_arg(ix, merged), merged["unet"], sd, torch.float32, "cpu")
    ref_merge = sd1.run(merged)
    ours = sd1.clone()
    assert adapter.merge_into(ours) == []
    ix.assert_outputs_close(sd1.run(ours), ref_fwd, sd1.base, what="lyco merge", keys=ix.TE_KEYS)
    gammas = set()
    idx_merged, idx_base, idx_ours = (module_index(ix, c) for c in (merged, sd1.comps, ours))
    for name, ma in adapter.modules.items():
        key = lyco_naming.file_module_key(name)
        w0 = idx_base[key].weight.double()
        gamma = ma.algorithm.scale(ma.tensors)
        gammas.add((ma.algo, round(gamma, 6)))
        torch.testing.assert_close(idx_merged[key].weight.double() - w0, gamma * (idx_ours[key].weight.double() - w0),
                                   rtol=1e-4, atol=1e-6)
    assert gammas == {("loha", 0.25), ("lokr", 0.5)}
    assert ix.max_rel_diff(ref_merge, ref_fwd) > 0.01


def test_lycoris_bug_bias_in_bypass(sd1, lyc, ix, tmp_path):
    """LyCORIS's bypass forward rotates (Diag-OFT, BOFT) or scales (IA3) the layer output *with*
    its bias, while its merge and rebuild forward — and every loader — leave the bias alone. The
    file means the merge; lyco follows it. (Diag-OFT on CLIP attention, IA3 on CLIP MLPs, BOFT on
    the UNet's middle transformer block: every one of those layers has a bias.)"""
    f = tmp_path / "bias.safetensors"
    comps = sd1.clone()
    preset = lyc.kohya_preset("attn-mlp", exclude_name=[r"(down|up)_blocks"], module_algo_map={
        "CLIPMLP": {"algo": "ia3"}, "Transformer2DModel": {"algo": "boft", "dim": 2}})
    net = lyc.create_network(comps, "diag-oft", multiplier=1.0, dim=4, preset=preset, bypass_mode=True)
    ix.randomise_(net.named_parameters())
    bypass = sd1.run(comps)
    for lora in net.loras:
        lora.bypass_mode = False
    rebuild = sd1.run(comps)
    net.save_weights(str(f), torch.float32, {})
    adapter = lyco.load(f)
    assert set(adapter.algos()) == {"diag-oft", "ia3", "boft"}
    assert all(n.startswith(("text_encoder.", "unet.mid_block.")) for n in adapter.modules)
    with adapter.attach(sd1.comps) as h:
        h.eval()
        got = sd1.run()
    ix.assert_outputs_close(got, rebuild, sd1.base, what="vs LyCORIS rebuild")
    for k in rebuild:  # far above fp32 noise (~1e-6) on every output
        assert ix.max_rel_diff({k: bypass[k]}, {k: rebuild[k]}) > 1e-3, k


def test_lycoris_bug_oft_rescale_at_multiplier(sd1, lyc, ix, tmp_path):
    """Diag-OFT with ``rescale`` at m ≠ 1: LyCORIS computes rescale ⊙ R_mᵀW (not W at m = 0);
    lyco applies W + m·(rescale ⊙ RᵀW − W) like every other adapter (m = 0 is the base model)."""
    f = tmp_path / "oft.safetensors"
    ref_lycoris, got, adapter, _ = lycoris_to_lyco(sd1, lyc, ix, f, "diag-oft", m=0.5, dim=4, rescaled=True,
                                                   preset=_te_only(lyc))
    oracle = sd1.clone()
    merge_file_dense(ix, oracle, f, 0.5)
    ix.assert_outputs_close(got, sd1.run(oracle), sd1.base, what="oft rescale vs W + m·ΔW", keys=ix.TE_KEYS)
    assert ix.max_rel_diff(got, ref_lycoris) > 0.01


# --------------------------------------------------------------------------------------
# 2. lyco → LyCORIS, every algorithm (create_network_from_weights + apply_to, un-merged forward)
# --------------------------------------------------------------------------------------

_LYCO_TUCKER = [{"module_class": "ResnetBlock2D", "use_tucker": True}]

#: id → (algo, multiplier, lyco.create options)
LYCO_CASES = {
    "lora": ("lora", 0.7, dict(rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0, rs_lora=True,
                               overrides=_LYCO_TUCKER)),
    # DyLoRA files are plain LoRA files (the conv layers are the interesting part)
    "dylora": ("dylora", 0.7, dict(rank=4, alpha=2.0, block_size=2, preset="unet-convblock-only")),
    "loha": ("loha", 0.7, dict(rank=2, alpha=1.0, overrides=_LYCO_TUCKER)),
    # (Tucker LoKr: LyCORIS cannot reload it through this loader, see the test below)
    "lokr": ("lokr", 0.7, dict(rank=2, alpha=1.0, factor=4, overrides=[
        {"module_class": "ResnetBlock2D", "factor": 2},
        {"module_class": "CLIPAttention", "decompose_both": True, "factor": -1, "rank": 1, "alpha": 0.5},
        {"module_class": "CLIPMLP", "full_matrix": True}])),
    "glora-full": ("glora", 0.7, dict(rank=2, alpha=1.0, overrides=[
        {"module_class": c, "algo": "full"} for c in ("ResnetBlock2D", "Downsample2D", "Upsample2D")])),
    "oft": ("diag-oft", 0.7, dict(rank=4, constraint=0.01, overrides=[
        {"module_class": c, "algo": "boft", "rank": 2} for c in ("ResnetBlock2D", "Downsample2D", "CLIPMLP")])),
    # at multiplier 1: DoRA on LoRA/LoHa/LoKr; Diag-OFT/BOFT with ``rescale``
    "dora-oft-rescaled": ("lora", 1.0, dict(rank=4, alpha=2.0, dora=True, overrides=[
        {"module_class": "ResnetBlock2D", "algo": "loha", "rank": 2, "use_tucker": True},
        {"module_class": "Downsample2D", "algo": "lokr", "rank": 2, "factor": 2},
        {"module_class": "Upsample2D", "algo": "diag-oft", "dora": False, "rescaled": True},
        {"module_class": "CLIPMLP", "algo": "boft", "rank": 2, "dora": False, "rescaled": True}])),
}


#: cases whose file is written in half precision
_LYCO_DTYPE = {"glora-full": torch.float16, "loha": torch.bfloat16}


@pytest.mark.parametrize("case", list(LYCO_CASES))
def test_lyco_file_loads_in_lycoris_sd1(case, sd1, lyc, ix, tmp_path):
    algo, m, opts = LYCO_CASES[case]
    dtype = _LYCO_DTYPE.get(case, torch.float32)
    f = tmp_path / f"{case}.safetensors"
    ref, got, n, _ = lyco_to_lycoris(sd1, lyc, ix, f, algo, m=m, dtype=dtype, **opts)
    assert {t.dtype for t in load_file(str(f)).values() if t.is_floating_point()} == {dtype}
    unet_only = opts.get("preset") == "unet-convblock-only"
    ix.assert_outputs_close(got, ref, sd1.base, dtype=dtype, what=case, keys=("unet",) if unet_only else None)
    keys = _module_keys(f)
    assert len(keys) == n and "lora_unet_down_blocks_0_resnets_0_conv1" in keys  # SD1: diffusers names
    assert unet_only or "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in keys


def test_lyco_ia3_file_loads_in_lycoris(sd1, lyc, ix, tmp_path):
    """IA3: LyCORIS cannot reload IA3 files through ``create_network_from_weights`` (its
    ``make_module_from_state_dict`` takes ``weight`` only and is handed ``on_input`` too); its resume
    path (``create_network`` + ``load_weights``) reads the same file and gives lyco's forward."""
    f = tmp_path / "ia3.safetensors"
    ref, got, n, _ = lyco_to_lycoris(sd1, lyc, ix, f, "ia3", m=0.7, loader="resume",
                                     lycoris_kw=dict(preset=lyc.kohya_preset("full")))
    ix.assert_outputs_close(got, ref, sd1.base, what="ia3")
    with pytest.raises(TypeError):
        lyc.from_weights(1.0, f, sd1.comps["text_encoder"], sd1.comps["unet"], apply=False)


def test_lyco_tucker_lokr_file_loads_in_lycoris(sd1, lyc, ix, tmp_path):
    """Tucker LoKr (``lokr_t2``, ``lokr_w2_a`` as (r, out_k)): lyco writes exactly LyCORIS's layout —
    LyCORIS's resume path loads it with no missing/unexpected/mis-shaped key and gives lyco's
    forward. LyCORIS's ``make_module_from_state_dict`` cannot rebuild Tucker LoKr at all (it reads
    the rank from ``lokr_w2_a.size(1)``, which is out_k in that layout) — not even its own files."""
    f = tmp_path / "lokr-tucker.safetensors"
    lycoris_kw = dict(dim=2, alpha=1.0, factor=2, use_tucker=True, preset=lyc.kohya_preset("unet-convblock-only"))
    ref, got, n, _ = lyco_to_lycoris(sd1, lyc, ix, f, "lokr", m=0.7, loader="resume", rank=2, alpha=1.0,
                                     factor=2, use_tucker=True, preset="unet-convblock-only", lycoris_kw=lycoris_kw)
    ix.assert_outputs_close(got, ref, sd1.base, what="tucker lokr", keys=("unet",))
    assert any(k.endswith(".lokr_t2") for k in _file_keys(f))
    comps = sd1.clone()
    with pytest.raises((AttributeError, RuntimeError)):
        lyc.from_weights(1.0, f, _te_arg(ix, comps), comps["unet"], apply=False)
    own = tmp_path / "lycoris-tucker.safetensors"
    lyc.create_network(comps, "lokr", **lycoris_kw).save_weights(str(own), None, {})
    assert {k: v.shape for k, v in load_file(str(own)).items()} == {k: v.shape for k, v in load_file(str(f)).items()}
    with pytest.raises((AttributeError, RuntimeError)):
        lyc.from_weights(1.0, own, _te_arg(ix, comps), comps["unet"], apply=False)


def test_lyco_file_loads_in_lycoris_sdxl(sdxl, lyc, ix, tmp_path):
    """SDXL files: LDM/SGM UNet names (what kohya writes; LyCORIS reads them on a kohya-style UNet,
    here the LDM view) and ``lora_te1_``/``lora_te2_``. (Writing diffusers names instead is checked
    in test_kohya_names.py.)"""
    f = tmp_path / "sdxl.safetensors"
    overrides = [{"module_class": "ResnetBlock2D", "algo": "loha", "rank": 2, "use_tucker": True},
                 {"module_class": "CLIPMLP", "algo": "lokr", "factor": 4}]
    ref, got, n, _ = lyco_to_lycoris(sdxl, lyc, ix, f, "lora", m=0.8, rank=4, alpha=2.0,
                                     overrides=overrides)
    ix.assert_outputs_close(got, ref, sdxl.base, what="sdxl")
    keys = _module_keys(f)
    assert {k.split("_text_model")[0] for k in keys if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    assert "lora_unet_output_blocks_2_2_conv" in keys and "lora_unet_input_blocks_1_0_in_layers_2" in keys
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in keys)


# --------------------------------------------------------------------------------------
# generic ``lycoris_`` prefix on a plain torch module, both directions
# --------------------------------------------------------------------------------------

#: id → (algo, LyCORIS create_lycoris kwargs, lyco.create options, multiplier)
GENERIC_CASES = {
    "lora": ("lora", dict(use_tucker=True), dict(rank=4, alpha=2.0, use_tucker=True), 0.7),
    # LyCORIS ``train_norm`` / lyco ``include_norm``: Norm (w_norm/b_norm) on the GroupNorm/LayerNorm
    "lora-norm": ("lora", dict(train_norm=True), dict(rank=4, alpha=2.0, preset={"include_norm": True, "model": {
        "target_modules": ["Linear", "Conv1d", "Conv2d", "Conv3d", "LayerNorm", "GroupNorm"]}}), 0.7),
    "loha": ("loha", dict(use_tucker=True), dict(rank=2, alpha=1.0, use_tucker=True), 0.7),
    "lokr": ("lokr", dict(factor=2), dict(rank=2, alpha=1.0, factor=2), 0.7),
    "full": ("full", {}, {}, 0.7),
    "glora": ("glora", {}, dict(rank=2, alpha=1.0), 0.7),
    "diag-oft": ("diag-oft", dict(constraint=0.01), dict(rank=2, constraint=0.01), 0.7),
    "boft": ("boft", {}, dict(rank=2), 0.7),
    "lora-dora": ("lora", dict(dora_wd=True), dict(rank=4, alpha=2.0, dora=True), 1.0),
    "lokr-dora": ("lokr", dict(factor=2, dora_wd=True), dict(rank=2, alpha=1.0, factor=2, dora=True), 1.0),
    # LyCORIS reloads IA3 only through its resume path (see test_lyco_ia3_file_loads_in_lycoris)
    "ia3": ("ia3", {}, {}, 0.7),
}


def _toy_input():
    return torch.randn(2, 3, 4, 6, 6, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("case", list(GENERIC_CASES))
def test_generic_prefix_both_directions(case, lyc, ix, tmp_path):
    algo, lkw, okw, m = GENERIC_CASES[case]
    x = _toy_input()
    base_model = ix.make_toy()
    with torch.no_grad():
        base = {"y": base_model(x)}
    # LyCORIS → lyco
    toy = ix.make_toy()
    net = lyc.create_lycoris(toy, algo, dim=4 if algo in ("lora", "diag-oft") else 2, alpha=2.0, multiplier=m, **lkw)
    ix.randomise_(net.named_parameters())
    with torch.no_grad():
        ref = {"y": toy(x)}
    f1 = tmp_path / "from_lycoris.safetensors"
    net.save_weights(str(f1), torch.float32, {})
    assert all(k.startswith("lycoris_") for k in _file_keys(f1))
    target = ix.make_toy()
    with lyco.load(f1).attach(target, multiplier=m) as h:
        h.eval()
        with torch.no_grad():
            got = {"y": target(x)}
        assert len(h.layers) == len(net.loras) and not h.unmatched
    ix.assert_outputs_close(got, ref, base, what=f"{case} LyCORIS→lyco")
    # lyco → LyCORIS
    src = ix.make_toy()
    ln = lyco.create(src, algo, **okw)
    ix.lyco_randomise_(ln, seed=3)
    ln.eval()
    ln.set_multiplier(m)
    with torch.no_grad():
        got = {"y": src(x)}
    f2 = tmp_path / "from_lyco.safetensors"
    ln.save(f2)
    n = len(ln.layers)
    ln.detach()
    assert all(k.startswith("lycoris_") for k in _file_keys(f2))
    dst = ix.make_toy()
    if algo == "ia3":
        lnet = lyc.create_lycoris(dst, algo, multiplier=m)
        assert not lnet.load_weights(str(f2))  # neither missing nor unexpected keys
    else:
        lnet, _ = lyc.lib.create_lycoris_from_weights(m, str(f2), dst)
        lnet.apply_to()
        lnet.eval()
    assert len(lnet.loras) == n
    with torch.no_grad():
        ref = {"y": dst(x)}
    ix.assert_outputs_close(got, ref, base, what=f"{case} lyco→LyCORIS")


def test_lycoris_bug_cannot_reload_input_axis_dora(lyc, ix, tmp_path):
    """A ``dora_scale`` on the input axis (1, in, …) — LyCORIS < 3.1.1, ``wd_on_output=False``, what
    A1111/InvokeAI assume — loads in lyco (the axis comes from the shape, as ComfyUI does), but
    LyCORIS's loader always builds output-axis DoRA and fails on it, its own files included. lyco
    therefore writes the output axis unless asked (``dora_axis="in"``)."""
    x = _toy_input()
    toy = ix.make_toy()
    net = lyc.create_lycoris(toy, "lora", dim=4, alpha=2.0, dora_wd=True, wd_on_output=False)
    ix.randomise_(net.named_parameters())
    with torch.no_grad():
        ref = {"y": toy(x)}
    f = tmp_path / "dora-in.safetensors"
    net.save_weights(str(f), torch.float32, {})
    assert all(v.shape[0] == 1 for k, v in load_file(str(f)).items() if k.endswith("dora_scale"))
    target = ix.make_toy()
    with lyco.load(f).attach(target) as h:
        h.eval()
        with torch.no_grad():
            got = {"y": target(x)}
    with torch.no_grad():
        base = {"y": ix.make_toy()(x)}
    ix.assert_outputs_close(got, ref, base, what="input-axis DoRA")
    with pytest.raises(RuntimeError):
        lyc.lib.create_lycoris_from_weights(1.0, str(f), ix.make_toy())
    ours = lyco.create(ix.make_toy(), "lora", rank=4, dora=True)
    assert all(ma.tensors["dora_scale"].shape[0] > 1 for ma in ours.to_adapter().modules.values())
    ours.detach()


# --------------------------------------------------------------------------------------
# 3. dtype conversions: fp32 / fp16 / bf16 files give the same ΔW within rounding
# --------------------------------------------------------------------------------------

#: relative (to the module's largest |ΔW|) tolerance per file dtype
DTYPE_RTOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _deltas(adapter, comps) -> dict[str, torch.Tensor]:
    plan, unmatched = lyco_network.plan_adapter(adapter, lyco_network.resolve_target(comps))
    assert not unmatched
    out = {}
    for name, mod, spec, ma in plan:
        t = {k: (v.double() if v.is_floating_point() else v) for k, v in ma.tensors.items()}
        out[name] = ma.algorithm.delta_weight(t, spec, mod.weight.detach().double())
    return out


def _assert_same_deltas(adapter_x, adapter_32, comps, dtype, what):
    dx, d32 = _deltas(adapter_x, comps), _deltas(adapter_32, comps)
    assert set(dx) == set(d32) and d32
    worst = 0.0
    for name in d32:
        scale = float(d32[name].abs().max())
        assert scale > 0, f"{what} {name}: zero delta"
        err = float((dx[name] - d32[name]).abs().max()) / scale
        worst = max(worst, err)
        assert err <= DTYPE_RTOL[dtype], f"{what} {name}: relative ΔW error {err:.3g} in {dtype}"
    assert worst > 0  # the file really was rounded


DTYPE_ALGOS = {
    "lora-tucker": ("lora", dict(use_tucker=True), dict(rank=4, alpha=2.0, use_tucker=True)),
    "loha": ("loha", dict(use_tucker=True), dict(rank=2, alpha=1.0, use_tucker=True)),
    "lokr-fullmatrix": ("lokr", dict(factor=2, full_matrix=True), dict(rank=2, factor=2, full_matrix=True)),
    "lokr": ("lokr", dict(factor=2), dict(rank=2, alpha=1.0, factor=2)),
    "ia3": ("ia3", {}, {}),
    "glora": ("glora", {}, dict(rank=2, alpha=1.0)),
    "full": ("full", {}, {}),
    "diag-oft": ("diag-oft", dict(constraint=0.01, rescaled=True), dict(rank=2, constraint=0.01, rescaled=True)),
    "boft": ("boft", {}, dict(rank=2)),
    "loha-dora": ("loha", dict(dora_wd=True), dict(rank=2, alpha=1.0, dora=True)),
}


@pytest.mark.parametrize("writer", ["lycoris", "lyco"])
@pytest.mark.parametrize("case", list(DTYPE_ALGOS))
def test_dtype_roundtrip_same_delta(case, writer, lyc, ix, tmp_path):
    algo, lkw, okw = DTYPE_ALGOS[case]
    toy = ix.make_toy()
    paths = {dt: tmp_path / f"{writer}-{str(dt)[6:]}.safetensors"
             for dt in (torch.float32, torch.float16, torch.bfloat16)}
    if writer == "lycoris":
        net = lyc.create_lycoris(toy, algo, dim=2, alpha=1.0, **lkw)
        ix.randomise_(net.named_parameters())
        for dt, p in paths.items():
            net.save_weights(str(p), dt, {})
    else:
        net = lyco.create(toy, algo, **okw)
        ix.lyco_randomise_(net)
        for dt, p in paths.items():
            net.save(p, dtype=_DTYPE_NAME[dt])
        net.detach()
    target = ix.make_toy()
    a32 = lyco.load(paths[torch.float32])
    for dt in (torch.float16, torch.bfloat16):
        floats = {t.dtype for t in load_file(str(paths[dt])).values() if t.is_floating_point()}
        assert floats == {dt}
        _assert_same_deltas(lyco.load(paths[dt]), a32, target, dt, f"{writer} {case}")


# --------------------------------------------------------------------------------------
# 5. family mismatch and shape errors: clear, up front, nothing modified
# --------------------------------------------------------------------------------------


def _state(comps) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c, m in comps.items() for k, v in m.state_dict().items()}


def _assert_untouched(comps, before, model=None):
    after = _state(comps)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} was modified"
    for c, root in comps.items():
        for name, mod in root.named_modules():
            assert "_lyco_host" not in mod.__dict__ and "forward" not in mod.__dict__, f"{c}.{name} left patched"
    if model is not None:
        out = model.run(comps)
        for k in model.base:
            assert torch.equal(out[k], model.base[k])


@pytest.fixture(scope="module")
def sdxl_file(sdxl, ix, tmp_path_factory):
    f = tmp_path_factory.mktemp("fam") / "sdxl.safetensors"
    net = lyco.create(sdxl.comps, "lora", rank=2, preset="attn-mlp")
    ix.lyco_randomise_(net)
    net.save(f)
    net.detach()
    return f


def test_family_mismatch_sdxl_file_on_sd1(sdxl_file, sd1):
    adapter = lyco.load(sdxl_file)
    assert adapter.family == "sdxl"
    before = _state(sd1.comps)
    for call in (lambda: adapter.attach(sd1.comps), lambda: adapter.merge_into(sd1.comps)):
        with pytest.raises(FamilyMismatch) as e:
            call()
        msg = str(e.value)
        assert "'sdxl'" in msg and "'sd1'" in msg and str(sdxl_file) in msg
        assert (e.value.found, e.value.expected) == ("sdxl", "sd1")
        _assert_untouched(sd1.comps, before, sd1)


def test_family_mismatch_can_be_overridden(sdxl_file, sd1, sdxl):
    """``family=`` (or ``strict=False``) skips the family check: the SDXL adapter's CLIP-L part
    fits the SD1 text encoder (same width in the tiny models). A lone text encoder cannot tell SD1
    from SDXL's first encoder, so it is not checked at all."""
    te_only = lyco.load(sdxl_file).subset(["text_encoder"])
    assert te_only.family == "sdxl"
    before = _state(sd1.comps)
    with pytest.raises(FamilyMismatch):
        te_only.attach(sd1.comps)
    _assert_untouched(sd1.comps, before, sd1)
    for kw in ({"family": "sd1"}, {"strict": False}):
        with te_only.attach(sd1.comps, **kw) as h:
            assert len(h.layers) == len(te_only) and not h.unmatched
            out = sd1.run()
        assert not torch.equal(out["text_encoder"], sd1.base["text_encoder"])
        assert torch.equal(out["unet"], sd1.base["unet"])  # only text-encoder modules in this adapter
    with te_only.attach({"text_encoder": sd1.comps["text_encoder"]}) as h:
        assert len(h.layers) == len(te_only)
    # the same adapter on its own model family needs no override
    with te_only.attach(sdxl.comps) as h:
        assert len(h.layers) == len(te_only)


def _fake_width_adapter(ctx_width: int) -> "lyco.Adapter":
    """A real-width SD UNet adapter (one cross-attention key projection), in memory."""
    t = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
         torch.randn(2, ctx_width),
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(320, 2),
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(1.0)}
    return lyco_kohya.from_state_dict(t, {}, source=f"fake-{ctx_width}.safetensors")


def test_family_mismatch_sd2_vs_sd1_by_cross_attention_width():
    """SD2 and SD1 share every name: the cross-attention width (1024 vs 768) tells them apart,
    on real-size UNets built on the meta device."""
    from lyco.models import configs
    sd1_unet = configs.build_unet("sd1", device="meta")
    sd2_unet = configs.build_unet("sd2", device="meta")
    sd2_adapter, sd1_adapter = _fake_width_adapter(1024), _fake_width_adapter(768)
    assert (sd2_adapter.family, sd1_adapter.family) == ("sd2", "sd1")
    for call in (lambda: sd2_adapter.attach({"unet": sd1_unet}), lambda: sd2_adapter.merge_into({"unet": sd1_unet})):
        with pytest.raises(FamilyMismatch) as e:
            call()
        assert (e.value.found, e.value.expected) == ("sd2", "sd1") and "fake-1024" in str(e.value)
    with pytest.raises(FamilyMismatch):
        sd1_adapter.attach({"unet": sd2_unet})
    assert not any("_lyco_host" in m.__dict__ for u in (sd1_unet, sd2_unet) for m in u.modules())
    with sd2_adapter.attach({"unet": sd2_unet}) as h:
        assert len(h.layers) == 1 and not h.unmatched
    # with the check overridden, the misfit is a shape error naming the module and both shapes
    with pytest.raises(ShapeMismatch) as e:
        sd2_adapter.attach({"unet": sd1_unet}, family="sd1")
    msg = str(e.value)
    assert "attn2.to_k" in msg and "shape (320, 1024)" in msg and "expected (320, 768)" in msg


def test_shape_mismatch_names_module_and_shapes_and_touches_nothing(sd1, ix, tmp_path):
    f = tmp_path / "ok.safetensors"
    net = lyco.create(sd1.comps, "lora", rank=2, preset="attn-mlp")
    ix.lyco_randomise_(net)
    net.save(f)
    net.detach()
    sd = load_file(str(f))
    bad_key = "lora_unet_mid_block_attentions_0_proj_out.lora_down.weight"
    sd[bad_key] = torch.randn(sd[bad_key].shape[0], sd[bad_key].shape[1] + 3, *sd[bad_key].shape[2:])
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    adapter = lyco.load(bad)
    before = _state(sd1.comps)
    for call in (lambda: adapter.attach(sd1.comps), lambda: adapter.merge_into(sd1.comps),
                 lambda: adapter.attach(sd1.comps, strict=False)):
        with pytest.raises(ShapeMismatch) as e:
            call()
        msg = str(e.value)
        assert "mid_block.attentions.0.proj_out" in msg, msg
        w = sd1.comps["unet"].mid_block.attentions[0].proj_out.weight
        found = (w.shape[0], w.shape[1] + 3) + tuple(w.shape[2:])
        assert f"shape {found} does not fit" in msg and f"expected {tuple(w.shape)}" in msg, msg
        _assert_untouched(sd1.comps, before, sd1)

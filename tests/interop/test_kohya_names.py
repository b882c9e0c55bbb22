"""Key names are the contract too: the module keys lyco writes equal those kohya's own rule and
LyCORIS produce, in both UNet naming styles, with the ``text_model`` level the ecosystem expects.

kohya's rule is re-implemented here from its description (ecosystem.md §1.2), not taken from lyco:
walk ``named_modules()``; inside every module whose class is a target block take each child whose
class is ``Linear`` or ``Conv2d`` (k×k convs only with ``conv_dim``); key = prefix + "." + block
path + "." + child path, dots → underscores. SDXL keys use the LDM/SGM names (conftest's
diffusers→LDM table).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import lyco
from lyco.errors import FormatError
from lyco.formats import kohya as lyco_kohya

UNET_BLOCKS = ("Transformer2DModel",)
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def kohya_rule(root, prefix: str, blocks, include_kxk: bool = False, rename=None) -> set[str]:
    """kohya ``LoRANetwork.create_modules``: Linear/Conv2d children of target-class blocks."""
    names = []
    for path, mod in root.named_modules():
        if type(mod).__name__ not in blocks:
            continue
        for sub, child in mod.named_modules():
            cls = type(child).__name__
            if cls not in ("Linear", "Conv2d") or not sub:
                continue
            if cls == "Conv2d" and child.kernel_size != (1, 1) and not include_kxk:
                continue
            full = f"{path}.{sub}"
            names.append(f"{prefix}.{rename(full) if rename else full}".replace(".", "_"))
    assert len(names) == len(set(names)), "duplicated lora name"
    return set(names)


def expected_keys(ix, model, blocks=UNET_BLOCKS, include_kxk=False) -> set[str]:
    """kohya's key set for a tiny model: SD1 with diffusers names and ``lora_te``, SDXL with LDM
    names (diffusers paths converted with the §1.2 table) and ``lora_te1``/``lora_te2``."""
    c = model.comps
    if model.family == "sdxl":
        rename = lambda p: ix.diffusers_to_ldm(p, "sdxl")  # noqa: E731
        keys = kohya_rule(c["unet"], "lora_unet", blocks, include_kxk, rename)
        keys |= kohya_rule(ix.te_view(c["text_encoder"]), "lora_te1", TE_BLOCKS)
        keys |= kohya_rule(ix.te_view(c["text_encoder_2"]), "lora_te2", TE_BLOCKS)
        return keys
    return (kohya_rule(c["unet"], "lora_unet", blocks, include_kxk)
            | kohya_rule(ix.te_view(c["text_encoder"]), "lora_te", TE_BLOCKS))


def lyco_keys(model, preset, naming="auto", **kw) -> set[str]:
    """The module keys lyco's writer produces for ``preset`` on the model."""
    net = lyco.create(model.comps, "lora", rank=1, preset=preset, **kw)
    try:
        sd = lyco_kohya.to_state_dict(net.to_adapter(), naming_style=naming)
    finally:
        net.detach()
    return {k.partition(".")[0] for k in sd}


def lycoris_keys(lyc, ix, model, preset_name, ldm=False, **changes) -> set[str]:
    """The module names LyCORIS's ``create_network`` gives (on a copy; ``ldm``: on the LDM view)."""
    comps = model.clone()
    unet = ix.ldm_view(comps["unet"], model.family) if ldm else None
    net = lyc.create_network(comps, "lora", dim=1, alpha=1.0, unet=unet,
                             preset=lyc.kohya_preset(preset_name, **changes))
    return {lora.lora_name for lora in net.loras}


# --------------------------------------------------------------------------------------
# the kohya LoRA default ("attn-mlp")
# --------------------------------------------------------------------------------------


def test_attn_mlp_keys_sd1_equal_kohya_and_lycoris(sd1, lyc, ix):
    ours = lyco_keys(sd1, "attn-mlp")
    assert ours == expected_keys(ix, sd1)
    assert ours == lycoris_keys(lyc, ix, sd1, "attn-mlp")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in ours
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in ours  # a 1×1 conv in SD1
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in ours
    # the text encoder is a transformers-5 CLIPTextModel without a ``text_model`` level...
    assert not hasattr(sd1.comps["text_encoder"], "text_model")
    # ...yet every text-encoder key carries it, as kohya/A1111/ComfyUI expect
    te = {k for k in ours if k.startswith("lora_te")}
    assert te and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te)


def test_attn_mlp_keys_sdxl_equal_kohya_and_lycoris(sdxl, lyc, ix):
    ours = lyco_keys(sdxl, "attn-mlp")
    assert ours == expected_keys(ix, sdxl)
    assert ours == lycoris_keys(lyc, ix, sdxl, "attn-mlp", ldm=True)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in ours
    assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2" in ours
    assert "lora_unet_output_blocks_0_1_proj_in" in ours
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in ours
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1" in ours
    assert not any(k.startswith("lora_te_") for k in ours)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_full_preset_conv_keys_equal_kohya_rule(family, ix, request):
    """With convs (kohya ``conv_dim``): ResNet/sampler blocks, every Linear and Conv2d inside."""
    model = request.getfixturevalue(family)
    ours = lyco_keys(model, {"unet": {"target_modules": [*UNET_BLOCKS, *CONV_BLOCKS]},
                             "text_encoder": {"target_modules": list(TE_BLOCKS)}, "include_conv": True})
    assert ours == expected_keys(ix, model, (*UNET_BLOCKS, *CONV_BLOCKS), include_kxk=True)
    if family == "sdxl":
        assert {"lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_emb_layers_1",
                "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_input_blocks_3_0_op",
                "lora_unet_output_blocks_2_2_conv", "lora_unet_middle_block_2_out_layers_3"} <= ours
    else:
        assert {"lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_downsamplers_0_conv",
                "lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_mid_block_resnets_1_time_emb_proj"} <= ours


# --------------------------------------------------------------------------------------
# lyco's presets against LyCORIS's presets of the same name
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["full", "full-lin", "unet-only", "unet-transformer-only", "unet-convblock-only"])
def test_presets_equal_lycoris(preset, sd1, lyc, ix):
    """Same module set as LyCORIS's builtin preset (without its duplicate ``TimestepEmbedding``
    class target, which makes LyCORIS itself crash on SD UNets: see conftest ``kohya_preset``)."""
    assert lyco_keys(sd1, preset) == lycoris_keys(lyc, ix, sd1, preset)


def test_attn_only_preset_vs_lycoris(sd1, lyc, ix):
    """LyCORIS's ``attn-only`` targets the classes ``CrossAttention``/``SelfAttention``, which
    diffusers renamed ``Attention`` long ago: on a diffusers UNet it adapts no UNet layer at all.
    lyco's ``attn-only`` targets ``Attention`` (q/k/v/out); on the text encoder both agree."""
    ours, theirs = lyco_keys(sd1, "attn-only"), lycoris_keys(lyc, ix, sd1, "attn-only")
    assert not {k for k in theirs if k.startswith("lora_unet")}
    assert {k for k in ours if k.startswith("lora_te")} == theirs
    unet = {k for k in ours if k.startswith("lora_unet")}
    assert unet and all(k.rsplit("_", 2)[-2:] in (["to", "q"], ["to", "k"], ["to", "v"], ["out", "0"]) for k in unet)


def test_lycoris_full_preset_crashes_on_diffusers_unet(sd1, lyc):
    """The ecosystem fact behind ``kohya_preset``: LyCORIS 4.1.3's own ``full`` preset names
    ``time_embedding.linear_1`` twice on an SD UNet (the class ``TimestepEmbedding`` and the name)."""
    name = lyc._register(dict(lyc.PRESET["full"]))
    comps = sd1.clone()
    with pytest.raises(AssertionError, match="duplicated lora name: lora_unet_time_embedding_linear_1"):
        lyc.kohya.create_network(1.0, 1, 1.0, None, comps["text_encoder"], comps["unet"], preset=name)


# --------------------------------------------------------------------------------------
# text encoders: the ``text_model`` level
# --------------------------------------------------------------------------------------


def test_text_model_level_both_ways(sd1, sdxl, ix, tmp_path):
    """A file written from a transformers-5 CLIPTextModel (no ``text_model``) says
    ``lora_te_text_model_…``; it loads onto the same model, onto that model wrapped under a
    ``text_model`` level, and is written identically from the wrapped model."""
    te = sd1.comps["text_encoder"]
    wrapped = ix.TextModelView(te)
    f_raw, f_wrapped = tmp_path / "raw.safetensors", tmp_path / "wrapped.safetensors"
    net = lyco.create({"text_encoder": te}, "loha", rank=2, preset="attn-mlp")
    ix.lyco_randomise_(net)
    net.eval()
    with torch.no_grad():
        ref = te(sd1.ids).last_hidden_state
    net.save(f_raw)
    net.detach()
    keys = {k.partition(".")[0] for k in load_file(str(f_raw))}
    assert keys and all(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    adapter = lyco.load(f_raw)
    for target in (te, wrapped):
        with adapter.attach({"text_encoder": target}) as h:
            assert len(h.layers) == len(keys) and not h.unmatched
            assert all(n.startswith("text_encoder.text_model.encoder.layers.") for n in
                       (layer.name for layer in h.layers.values()))
            with torch.no_grad():
                torch.testing.assert_close(target(sd1.ids).last_hidden_state, ref)
    # the same adapter created on the wrapped model writes the same keys
    net = lyco.create({"text_encoder": wrapped}, "loha", rank=2, preset="attn-mlp")
    net.save(f_wrapped)
    net.detach()
    assert {k.partition(".")[0] for k in load_file(str(f_wrapped))} == keys
    # CLIPTextModelWithProjection (SDXL's second encoder) keeps its ``text_model`` level
    te2 = sdxl.comps["text_encoder_2"]
    assert hasattr(te2, "text_model")
    two = lyco_keys(sdxl, "attn-mlp")
    assert {k for k in two if k.startswith("lora_te2")} == {
        k.replace("lora_te_", "lora_te2_") for k in keys}


# --------------------------------------------------------------------------------------
# both UNet naming styles
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_ldm_and_diffusers_files_load_to_the_same_adapter(family, ix, request, tmp_path):
    model = request.getfixturevalue(family)
    net = lyco.create(model.comps, "lora", rank=1, preset="full")
    ix.lyco_randomise_(net)
    files = {}
    for style in ("ldm", "diffusers"):
        files[style] = tmp_path / f"{style}.safetensors"
        net.save(files[style], naming=style)
    net.detach()
    ldm_keys = {k.partition(".")[0] for k in load_file(str(files["ldm"]))}
    dif_keys = {k.partition(".")[0] for k in load_file(str(files["diffusers"]))}
    # the LDM file's UNet keys are the diffusers ones through the independent §1.2/§2.2 table
    dotted = {"lora_unet_" + p.replace(".", "_"): p for p, _ in model.comps["unet"].named_modules()}
    conv = {k if not k.startswith("lora_unet_") else
            "lora_unet_" + ix.diffusers_to_ldm(dotted[k], family).replace(".", "_") for k in dif_keys}
    assert ldm_keys == conv
    upsampler = {"sd1": "lora_unet_output_blocks_2_1_conv", "sdxl": "lora_unet_output_blocks_2_2_conv"}[family]
    assert upsampler in ldm_keys and "lora_unet_up_blocks_0_upsamplers_0_conv" in dif_keys
    # (the LDM file without lyco's metadata, as LyCORIS writes it, is read in test_lycoris_files.py)
    adapters = [lyco.load(files["ldm"]), lyco.load(files["diffusers"])]
    names = set(adapters[0].modules)
    assert "unet.up_blocks.0.upsamplers.0.conv" in names
    for a in adapters[1:]:
        assert set(a.modules) == names
        for n in names:
            for k, t in adapters[0].modules[n].tensors.items():
                assert torch.equal(a.modules[n].tensors[k], t), (n, k)
    # (identical adapters:) every module attaches to the real layer
    with adapters[0].attach(model.comps) as h:
        assert len(h.layers) == len(names) and not h.unmatched


def test_mixed_unet_naming_styles_are_refused(sd1, tmp_path):
    f = tmp_path / "ok.safetensors"
    net = lyco.create(sd1.comps, "lora", rank=2, preset="attn-mlp")
    net.save(f)
    net.detach()
    sd = load_file(str(f))
    sd = {k.replace("lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_"): v for k, v in sd.items()}
    mixed = tmp_path / "mixed.safetensors"
    save_file(sd, str(mixed))
    with pytest.raises(FormatError) as e:
        lyco.load(mixed)
    msg = str(e.value)
    assert "mixes UNet naming styles" in msg and "middle_block_1" in msg and "down_blocks" in msg
    assert str(mixed) in msg


def test_time_embedding_is_not_mistaken_for_ldm(sd1, tmp_path):
    """``time_embedding_linear_1`` (diffusers) starts with the LDM block name ``time_embed``: a
    file with it and other diffusers keys (every LyCORIS/kohya ``full`` file) is one style."""
    f = tmp_path / "full.safetensors"
    net = lyco.create(sd1.comps, "lora", rank=1, preset={"unet": {
        "target_names": ["time_embedding.linear_1", "down_blocks.0.resnets.0.conv1"]}})
    net.save(f, naming="diffusers")
    net.detach()
    keys = {k.partition(".")[0] for k in load_file(str(f))}
    assert "lora_unet_time_embedding_linear_1" in keys and "lora_unet_down_blocks_0_resnets_0_conv1" in keys
    a = lyco.load(f)
    assert "unet.time_embedding.linear_1" in a.modules

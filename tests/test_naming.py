"""naming: un-flattening, UNet style conversion and prefixes, against the real architectures."""

import pytest

from lyco import naming
from lyco.errors import FormatError


@pytest.mark.parametrize("family,component", [("sd1", "unet"), ("sd2", "unet"), ("sdxl", "unet"),
                                              ("sd1", "text_encoder"), ("sdxl", "text_encoder_2")])
def test_dot_path_restores_every_real_module_name(family, component):
    table = naming.family_flat_table(family, component)  # built from the real configs on the meta device
    assert len(table) > 100
    wrong = {f: d for f, d in table.items() if naming.dot_path(naming.flatten(d)) != d}
    assert not wrong, list(wrong.items())[:5]


@pytest.mark.parametrize("family,layout", [("sd1", naming.SD1_LAYOUT), ("sdxl", naming.SDXL_LAYOUT)])
def test_unet_ldm_round_trip_on_real_names(family, layout):
    table = naming.family_flat_table(family, "unet")
    dotted = {d for d in table.values() if "." in d or d in ("conv_in", "conv_out", "conv_norm_out")}
    for d in dotted:
        f = naming.flatten(d)
        ldm = naming.unet_flat_to_ldm(f, layout)
        assert naming.unet_flat_from_ldm(ldm, layout) == f, (d, ldm)


def test_known_ldm_names():
    # spot checks from kohya's / A1111's conversion tables
    s1, sx = naming.SD1_LAYOUT, naming.SDXL_LAYOUT
    assert naming.unet_flat_to_ldm("down_blocks_1_attentions_0_proj_in", s1) == "input_blocks_4_1_proj_in"
    assert naming.unet_flat_to_ldm("up_blocks_0_upsamplers_0_conv", s1) == "output_blocks_2_1_conv"
    assert naming.unet_flat_to_ldm("up_blocks_0_upsamplers_0_conv", sx) == "output_blocks_2_2_conv"
    assert naming.unet_flat_to_ldm("down_blocks_0_downsamplers_0_conv", sx) == "input_blocks_3_0_op"
    assert naming.unet_flat_to_ldm("down_blocks_0_resnets_1_conv1", sx) == "input_blocks_2_0_in_layers_2"
    assert naming.unet_flat_to_ldm("mid_block_resnets_1_time_emb_proj", s1) == "middle_block_2_emb_layers_1"
    assert naming.unet_flat_to_ldm("mid_block_attentions_0_proj_out", sx) == "middle_block_1_proj_out"
    assert naming.unet_flat_to_ldm("add_embedding_linear_2", sx) == "label_emb_0_2"
    assert naming.unet_flat_to_ldm("time_embedding_linear_1", s1) == "time_embed_0"
    assert naming.unet_flat_to_ldm("up_blocks_1_resnets_2_conv_shortcut", sx) == "output_blocks_5_0_skip_connection"


def test_parse_key_prefixes():
    assert naming.parse_key("lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha") == (
        "text_encoder", "text_model_encoder_layers_0_mlp_fc1", "alpha")
    assert naming.parse_key("lora_te2_x.lora_up.weight")[0] == "text_encoder_2"
    assert naming.parse_key("lora_te_x.lora_up.weight")[0] == "text_encoder"
    assert naming.parse_key("lycoris_fc1.hada_w1_a") == ("model", "fc1", "hada_w1_a")
    with pytest.raises(FormatError, match="unknown module prefix"):
        naming.parse_key("lora_vae_x.lora_up.weight", file="f.safetensors")
    with pytest.raises(FormatError, match="f.safetensors"):
        naming.parse_key("no_dot_here", file="f.safetensors")

"""The one UNet diffusers↔LDM table (``lyco.naming``), in both of its views: dotted names (base
checkpoints, ``lyco.formats.checkpoint``) and flattened names (adapter file keys)."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from lyco import naming
from lyco.errors import ConfigError, UnknownKeys
from lyco.formats import checkpoint as K
from lyco.models import configs as C


@pytest.fixture(scope="module")
def unets():
    return {f: C.build_unet(f, device="meta") for f in ("sd1", "sd2", "sdxl")}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_dotted_mapping_is_a_bijection_that_diffusers_inverts(unets, family):
    """Every parameter of the real UNet gets its own LDM key, and diffusers' own single-file
    converter (an independent table) maps each key back to the parameter it came from."""
    unet = unets[family]
    names = list(unet.state_dict())
    ldm = {K.UNET_PREFIX + naming.unet_diffusers_to_ldm(n, unet): torch.tensor(float(i))
           for i, n in enumerate(names)}
    assert len(ldm) == len(names)  # injective
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(names)
    wrong = [n for i, n in enumerate(names) if back[n].item() != i]
    assert not wrong, wrong[:5]
    for key in ldm:  # and our own inverse agrees
        name = names[int(ldm[key].item())]
        assert naming.unet_ldm_to_diffusers(key[len(K.UNET_PREFIX):], unet) == name


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_flat_and_dotted_views_agree_on_every_real_name(unets, family):
    unet = unets[family]
    lay = naming.unet_layout(unet)
    names = [n for n, _ in unet.named_modules() if n] + list(unet.state_dict())
    mapped = 0
    for d in names:
        try:
            ldm = naming.unet_diffusers_to_ldm(d, lay)
        except UnknownKeys:  # no LDM counterpart (time_proj, down_blocks.0, a resnet's dropout …);
            continue         # the lenient flat view may still number such a name's block
        mapped += 1
        assert naming.unet_flat_to_ldm(naming.flatten(d), lay) == naming.flatten(ldm), d
        assert naming.unet_flat_from_ldm(naming.flatten(ldm), lay) == naming.flatten(d), ldm
    assert mapped > 0.9 * len(names)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_layout_from_module_names_matches_the_config(unets, family):
    unet = unets[family]
    bare = torch.nn.Module()  # same module tree, no diffusers config
    for name, child in unet.named_children():
        bare.add_module(name, child)
    assert naming.unet_layout(bare) == naming.unet_layout(unet) == naming.unet_layout(family)
    assert naming.unet_layout(family) == (naming.SDXL_LAYOUT if family == "sdxl" else naming.SD1_LAYOUT)


def test_unet_without_ldm_equivalent_gets_no_ldm_aliases():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(8, 16), layers_per_block=(1, 2), norm_num_groups=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=8,
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
    with pytest.raises(ConfigError, match="layers_per_block"):
        naming.unet_layout(unet)
    table = naming.NameTable(naming.UNET, unet)
    assert table.layout is None
    assert table.resolve("down_blocks.0.attentions.0.proj_in") == "down_blocks.0.attentions.0.proj_in"
    assert table.resolve("input_blocks_1_1_proj_in") is None

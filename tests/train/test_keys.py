"""The trainer's adapter, written to a file, uses exactly kohya's key names (snapshot of the tiny
SD1 and SDXL models, ``attn-mlp`` preset), cross-checked against an independent re-implementation
of kohya's naming walk."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lyco.formats import kohya
from lyco.models.tiny import tiny_pipeline
from lyco.train import from_dict
from lyco.train.loop import build_network

SNAP = Path(__file__).with_name("snapshots")

UNET_TARGETS = {"Transformer2DModel"}
TE_TARGETS = {"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"}


def _sdxl_ldm(path: str) -> str:
    """kohya's SDXL diffusers→SGM table, for the transformer blocks (all attn-mlp targets)."""
    m = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{3 * i + j + 1}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{3 * i + j}.1.{rest}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", path)
    if m:
        return f"middle_block.1.{m[1]}"
    raise AssertionError(f"unexpected SDXL target {path}")


def kohya_reference_keys(pipe, family: str) -> set[str]:
    """kohya LoRANetwork's walk: Linear/1×1-Conv2d children of the target blocks, prefix + path with
    dots → underscores; SDXL UNet in SGM names; text encoders as transformers' CLIPTextModel paths."""
    out = set()
    parts = [("lora_unet", pipe.unet, UNET_TARGETS)]
    if family == "sdxl":
        parts += [("lora_te1", pipe.text_encoder, TE_TARGETS), ("lora_te2", pipe.text_encoder_2, TE_TARGETS)]
    else:
        parts += [("lora_te", pipe.text_encoder, TE_TARGETS)]
    for prefix, root, targets in parts:
        for name, mod in root.named_modules():
            if type(mod).__name__ not in targets:
                continue
            for cname, child in mod.named_modules():
                kind = type(child).__name__
                if kind == "Conv2d" and tuple(child.kernel_size) != (1, 1):
                    continue  # k×k convs need conv_dim
                if kind not in ("Linear", "Conv2d"):
                    continue
                path = f"{name}.{cname}"
                if prefix == "lora_unet" and family == "sdxl":
                    path = _sdxl_ldm(path)
                if prefix.startswith("lora_te") and not path.startswith("text_model."):
                    path = "text_model." + path  # transformers >= 5 dropped the level kohya names
                out.add(f"{prefix}_{path.replace('.', '_')}")
    return out


def trainer_keys(pipe, family: str) -> set[str]:
    cfg = from_dict({"network": {"algo": "lora", "rank": 2, "preset": "attn-mlp"}})
    net, _ = build_network(pipe, cfg, family)
    try:
        sd = kohya.to_state_dict(net.to_adapter())
    finally:
        net.detach()
    return {k.split(".", 1)[0] for k in sd}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_attn_mlp_keys_match_kohya_snapshot(family):
    pipe = tiny_pipeline(family)
    keys = trainer_keys(pipe, family)
    snap = set(SNAP.joinpath(f"{family}_attn_mlp_keys.txt").read_text().split())
    assert keys == snap, (f"extra: {sorted(keys - snap)[:5]}, missing: {sorted(snap - keys)[:5]}")
    assert kohya_reference_keys(pipe, family) == snap


def test_snapshot_spot_checks():
    sd1 = set(SNAP.joinpath("sd1_attn_mlp_keys.txt").read_text().split())
    for k in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
              "lora_unet_down_blocks_0_attentions_0_proj_in",
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2",
              "lora_unet_mid_block_attentions_0_proj_out",
              "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v",
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
              "lora_te_text_model_encoder_layers_1_mlp_fc2"):
        assert k in sd1, k
    assert not any(k.startswith(("lora_te1_", "lora_te2_")) or "input_blocks" in k for k in sd1)
    assert not any("resnets" in k or "conv1" in k for k in sd1)  # no k×k convs / ResNets in attn-mlp
    xl = set(SNAP.joinpath("sdxl_attn_mlp_keys.txt").read_text().split())
    for k in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
              "lora_unet_input_blocks_7_1_transformer_blocks_1_ff_net_2",
              "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k",
              "lora_unet_output_blocks_0_1_proj_in",
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
              "lora_te2_text_model_encoder_layers_1_mlp_fc1"):
        assert k in xl, k
    assert not any(k.startswith("lora_te_") or "down_blocks" in k or "text_projection" in k for k in xl)

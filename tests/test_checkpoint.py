"""Base-model checkpoints: name mapping, lazy reading, single-file round trips, safety."""

from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors import safe_open

from lyco.errors import FormatError, LycoError, UnknownKeys, UnsafeFile
from lyco.formats import checkpoint as K
from lyco.models import configs as C
from lyco.models import tiny

FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def real():
    return {f: C.build_components(f, device="meta") for f in FAMILIES}


@pytest.fixture(scope="module")
def pipes():
    return {f: tiny.tiny_pipeline(f, seed=0) for f in FAMILIES}


@pytest.fixture(scope="module")
def single_files(pipes, tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    return {f: tiny.save_tiny_single_file(pipes[f], d / f"{f}.safetensors") for f in FAMILIES}


# --- UNet table -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_unet_mapping_round_trips_every_real_name(real, family):
    unet = real[family]["unet"]
    layout = K.unet_layout(unet)
    names = list(unet.state_dict()) + [n for n, m in unet.named_modules()
                                       if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    ldm = {}
    for name in names:
        key = K.unet_diffusers_to_ldm(name, layout)
        assert K.unet_ldm_to_diffusers(key, layout) == name
        assert ldm.setdefault(key, name) == name, f"{key} claimed by two names"
    params = [K.unet_diffusers_to_ldm(n, layout) for n in unet.state_dict()]
    assert len(set(params)) == {"sd1": 686, "sd2": 686, "sdxl": 1680}[family]
    assert all(re.match(r"(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)\.", k) for k in params)


SPOT = [
    # (family, diffusers, LDM) from the reference tables (§1.2, §2.2)
    ("sd1", "down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"),
    ("sd1", "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight",
     "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"),
    ("sd1", "down_blocks.0.resnets.0.conv1.weight", "input_blocks.1.0.in_layers.2.weight"),
    ("sd1", "down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("sd1", "down_blocks.2.resnets.1.time_emb_proj", "input_blocks.8.0.emb_layers.1"),
    ("sd1", "down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("sd1", "down_blocks.2.downsamplers.0.conv.bias", "input_blocks.9.0.op.bias"),
    ("sd1", "down_blocks.3.resnets.1.norm2", "input_blocks.11.0.out_layers.0"),
    ("sd1", "mid_block.resnets.0.norm1", "middle_block.0.in_layers.0"),
    ("sd1", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", "middle_block.1.transformer_blocks.0.ff.net.0.proj"),
    ("sd1", "mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("sd1", "up_blocks.0.resnets.2.conv1", "output_blocks.2.0.in_layers.2"),
    ("sd1", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
    ("sd1", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("sd1", "up_blocks.2.upsamplers.0.conv", "output_blocks.8.2.conv"),
    ("sd1", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2", "output_blocks.11.1.transformer_blocks.0.ff.net.2"),
    ("sd1", "up_blocks.1.attentions.0.proj_out", "output_blocks.3.1.proj_out"),
    ("sd1", "time_embedding.linear_1", "time_embed.0"),
    ("sd1", "time_embedding.linear_2.weight", "time_embed.2.weight"),
    ("sd1", "conv_in.weight", "input_blocks.0.0.weight"),
    ("sd1", "conv_norm_out.bias", "out.0.bias"),
    ("sd1", "conv_out", "out.2"),
    ("sdxl", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("sdxl", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("sdxl", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
     "input_blocks.4.1.transformer_blocks.1.attn2.to_k"),
    ("sdxl", "down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("sdxl", "down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
    ("sdxl", "down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
    ("sdxl", "mid_block.attentions.0.transformer_blocks.9.ff.net.2", "middle_block.1.transformer_blocks.9.ff.net.2"),
    ("sdxl", "up_blocks.0.attentions.0.proj_in", "output_blocks.0.1.proj_in"),
    ("sdxl", "up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
    ("sdxl", "add_embedding.linear_1.weight", "label_emb.0.0.weight"),
    ("sdxl", "add_embedding.linear_2", "label_emb.0.2"),
    ("sdxl", "down_blocks.0.resnets.1.conv2", "input_blocks.2.0.out_layers.3"),
]


@pytest.mark.parametrize("family,diffusers,ldm", SPOT)
def test_unet_spot_checks(family, diffusers, ldm):
    assert K.unet_diffusers_to_ldm(diffusers, family) == ldm
    assert K.unet_ldm_to_diffusers(ldm, family) == diffusers


@pytest.mark.parametrize("family,name,direction", [
    ("sd1", "down_blocks.3.attentions.0.proj_in", "d2l"),      # last SD1 down block has no attention
    ("sd1", "down_blocks.3.downsamplers.0.conv", "d2l"),       # … and no downsampler
    ("sd1", "up_blocks.3.upsamplers.0.conv", "d2l"),
    ("sdxl", "down_blocks.0.attentions.0.proj_in", "d2l"),     # SDXL's first block has none
    ("sd1", "time_embedding.cond_proj", "d2l"),
    ("sd1", "input_blocks.12.0.op", "l2d"),
    ("sd1", "output_blocks.2.2.conv", "l2d"),                  # SD1 keeps that upsampler at .1.
    ("sdxl", "output_blocks.8.2.conv", "l2d"),                 # the last up block has no upsampler
    ("sdxl", "input_blocks.1.1.proj_in", "l2d"),
    ("sd1", "input_blocks.1.0.in_layers.1", "l2d"),
])
def test_unet_mapping_rejects_names_outside_the_layout(family, name, direction):
    fn = K.unet_diffusers_to_ldm if direction == "d2l" else K.unet_ldm_to_diffusers
    with pytest.raises(UnknownKeys):
        fn(name, family)


def test_unet_layout_from_everything(real):
    lay = K.unet_layout("sd1")
    assert lay == K.unet_layout(real["sd1"]["unet"]) == K.unet_layout(C.get_config("sd1", "unet"))
    assert lay.down_attn == (True, True, True, False) and lay.up_attn == (False, True, True, True)
    assert K.unet_layout("sdxl").up_attn == (True, True, False)
    assert K.unet_layout(tiny.tiny_components("sdxl")["unet"]) == K.unet_layout("sdxl")


# --- VAE and text encoders ------------------------------------------------------------------

def test_vae_mapping_round_trips_and_spot_checks(real):
    vae = real["sd1"]["vae"]
    keys = set()
    for name in vae.state_dict():
        key = K.vae_diffusers_to_ldm(name, 4)
        assert K.vae_ldm_to_diffusers(key, 4) == name
        keys.add(key)
    assert len(keys) == 248
    for d, l in [
        ("encoder.down_blocks.0.resnets.0.conv1.weight", "encoder.down.0.block.0.conv1.weight"),
        ("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", "encoder.down.1.block.0.nin_shortcut.weight"),
        ("encoder.down_blocks.0.downsamplers.0.conv.weight", "encoder.down.0.downsample.conv.weight"),
        ("encoder.mid_block.resnets.1.norm1.bias", "encoder.mid.block_2.norm1.bias"),
        ("encoder.mid_block.attentions.0.group_norm.weight", "encoder.mid.attn_1.norm.weight"),
        ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
        ("decoder.up_blocks.0.resnets.0.conv1.weight", "decoder.up.3.block.0.conv1.weight"),
        ("decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.up.3.upsample.conv.weight"),
        ("decoder.up_blocks.3.resnets.0.conv_shortcut.bias", "decoder.up.0.block.0.nin_shortcut.bias"),
        ("decoder.mid_block.attentions.0.to_q.weight", "decoder.mid.attn_1.q.weight"),
        ("decoder.mid_block.attentions.0.to_out.0.bias", "decoder.mid.attn_1.proj_out.bias"),
        ("quant_conv.weight", "quant_conv.weight"),
        ("post_quant_conv.bias", "post_quant_conv.bias"),
    ]:
        assert K.vae_diffusers_to_ldm(d, 4) == l and K.vae_ldm_to_diffusers(l, 4) == d
    assert K.vae_attention_is_conv("decoder.mid_block.attentions.0.to_v.weight")
    assert not K.vae_attention_is_conv("decoder.mid_block.attentions.0.to_v.bias")
    with pytest.raises(UnknownKeys):
        K.vae_diffusers_to_ldm("decoder.up_blocks.3.upsamplers.0.conv.weight", 4)


def test_openclip_names_and_fused_slices():
    w = 8
    assert K.hf_to_openclip("text_model.encoder.layers.3.mlp.fc1.weight", w) == \
        ("transformer.resblocks.3.mlp.c_fc.weight", None, False)
    assert K.hf_to_openclip("text_model.encoder.layers.0.mlp.fc2.bias", w)[0] == "transformer.resblocks.0.mlp.c_proj.bias"
    assert K.hf_to_openclip("text_model.encoder.layers.0.self_attn.out_proj.weight", w)[0] == \
        "transformer.resblocks.0.attn.out_proj.weight"
    assert K.hf_to_openclip("text_model.encoder.layers.1.layer_norm1.weight", w)[0] == "transformer.resblocks.1.ln_1.weight"
    assert K.hf_to_openclip("text_model.final_layer_norm.bias", w)[0] == "ln_final.bias"
    assert K.hf_to_openclip("text_model.embeddings.position_embedding.weight", w)[0] == "positional_embedding"
    assert K.hf_to_openclip("text_projection.weight", w) == ("text_projection", None, True)
    fused = torch.randn(3 * w, w)
    parts = {}
    for name, rows, tr in K.openclip_to_hf("transformer.resblocks.2.attn.in_proj_weight", w):
        assert K.hf_to_openclip(name, w) == ("transformer.resblocks.2.attn.in_proj_weight", rows, tr)
        parts[name.split(".")[-2]] = K.KeyRef("x", rows).to_canonical(fused)
    assert list(parts) == ["q_proj", "k_proj", "v_proj"]
    assert torch.equal(torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]]), fused)
    assert torch.equal(parts["k_proj"], fused[w:2 * w])
    with pytest.raises(UnknownKeys):
        K.openclip_to_hf("logit_scale", w)


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_file_mapping_of_real_models(real, family):
    layout = K.single_file_layout(family)
    files: dict[str, list[str]] = {}
    for comp, module in real[family].items():
        for name in K.canonical_state_dict(module, comp):
            ref = K.to_file_ref(name, layout)
            assert dict(K.from_file_key(ref.key, layout))[name] == ref
            files.setdefault(ref.key, []).append(name)
    # only fused OpenCLIP in_proj tensors hold several names (q, k, v)
    assert all(len(v) == 1 or k.endswith(("in_proj_weight", "in_proj_bias")) and len(v) == 3
               for k, v in files.items())
    assert len(files) == {"sd1": 1130, "sd2": 1214, "sdxl": 2513}[family]
    if family == "sdxl":
        assert "conditioner.embedders.1.model.text_projection" in files
        assert "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in files
        assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in files
    if family == "sd2":
        assert "cond_stage_model.model.transformer.resblocks.22.ln_2.bias" in files
    if family == "sd1":
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in files
        assert "first_stage_model.decoder.up.0.block.2.conv2.weight" in files


def test_detect_family_from_keys():
    u = "model.diffusion_model.input_blocks.0.0.weight"
    assert K.detect_family([u, "cond_stage_model.transformer.text_model.final_layer_norm.weight"]) == "sd1"
    assert K.detect_family([u, "cond_stage_model.model.ln_final.weight"]) == "sd2"
    assert K.detect_family([u, "conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    probe = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert K.detect_family([u, probe], shape=lambda k: (320, 1024)) == "sd2"
    assert K.detect_family([u, probe], shape=lambda k: (320, 768)) == "sd1"
    with pytest.raises(FormatError):
        K.detect_family(["something.else"])


# --- single files ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip_is_bit_identical(pipes, single_files, family):
    pipe = pipes[family]
    again = K.load_pipeline(single_files[family])
    assert type(again) is type(pipe)
    comps = [c for c in C.COMPONENTS[family]]
    for comp in comps:
        a, b = pipe.components[comp].state_dict(), again.components[comp].state_dict()
        assert a.keys() == b.keys(), comp
        bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
        assert not bad, (comp, bad[:4])
    ids = pipe.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, again.tokenizer("a photo of a cat", padding="max_length", max_length=77,
                                            return_tensors="pt").input_ids)
    with torch.no_grad():
        for te in ("text_encoder", "text_encoder_2"):
            if te in comps:
                o1 = pipe.components[te](ids, output_hidden_states=True)
                o2 = again.components[te](ids, output_hidden_states=True)
                assert torch.equal(o1.hidden_states[-2], o2.hidden_states[-2])
                assert torch.equal(o1[0], o2[0])
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        ctx = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        kw = {}
        if family == "sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]])}
        assert torch.equal(pipe.unet(x, 5, ctx, **kw).sample, again.unet(x, 5, ctx, **kw).sample)
    assert again.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    assert type(again.scheduler) is type(pipe.scheduler)


def test_single_file_uses_ldm_layout(single_files, pipes):
    with safe_open(str(single_files["sd1"]), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.diffusion_model.input_blocks.4.1.proj_in.weight").get_shape()[-2:] == [1, 1]
        assert f.get_slice("first_stage_model.decoder.mid.attn_1.q.weight").get_shape()[-2:] == [1, 1]
        assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys
        assert "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in keys
        assert "lyco.configs" in f.metadata()
    assert not any(k.startswith(("unet.", "vae.", "text_encoder")) for k in keys)
    with safe_open(str(single_files["sd2"]), "pt") as f:
        assert f.get_slice("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight").get_shape() == [96, 32]
        assert f.get_slice("model.diffusion_model.input_blocks.4.1.proj_in.weight").get_shape() == [16, 16]
    with safe_open(str(single_files["sdxl"]), "pt") as f:
        keys = set(f.keys())
        assert "model.diffusion_model.output_blocks.2.2.conv.weight" in keys
        assert "model.diffusion_model.label_emb.0.0.weight" in keys
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
        proj = f.get_tensor("conditioner.embedders.1.model.text_projection")
    assert torch.equal(proj, pipes["sdxl"].text_encoder_2.text_projection.weight.t())


def test_checkpoint_reads_lazily_with_fused_slices(single_files, pipes):
    te2 = pipes["sdxl"].text_encoder_2
    with K.open_checkpoint(single_files["sdxl"]) as ck:
        assert ck.family == "sdxl" and ck.kind == "safetensors" and not ck.unmapped
        name = "text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj.weight"
        ref = ck.ref(name)
        assert ref == K.KeyRef("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight", (32, 64))
        assert ck.shape(ref.key) == (96, 32) and ck.dtype(ref.key) == torch.float32
        assert ck.canonical_shape(name) == (32, 32)
        assert torch.equal(ck.get_canonical(name), te2.text_model.encoder.layers[1].self_attn.k_proj.weight)
        full = ck.get(ref.key)
        qkv = [te2.text_model.encoder.layers[1].self_attn.__getattr__(p).weight for p in ("q_proj", "k_proj", "v_proj")]
        assert torch.equal(full, torch.cat(qkv))
        tp = "text_encoder_2.text_projection.weight"
        assert ck.ref(tp).transpose and torch.equal(ck.get_canonical(tp), te2.text_projection.weight)
        assert ck.canonical_shape(tp) == tuple(te2.text_projection.weight.shape)
        q = "vae.decoder.mid_block.attentions.0.to_q.weight"
        assert ck.ref(q).conv1x1 and ck.canonical_shape(q) == (16, 16)
        assert torch.equal(ck.get_canonical(q), pipes["sdxl"].vae.decoder.mid_block.attentions[0].to_q.weight)
        assert set(ck.names("text_encoder")) == set(K.canonical_state_dict(pipes["sdxl"].text_encoder, "text_encoder"))
        with pytest.raises(UnknownKeys):
            ck.get("nope")


def test_single_file_without_lyco_metadata_uses_detection(single_files, pipes, tmp_path):
    # strip lyco.configs: the family comes from the keys, the layout from the real config
    with K.open_checkpoint(single_files["sd1"]) as ck:
        bare = K.write_single_file(((k, ck.get(k)) for k in ck.keys()), tmp_path / "bare.safetensors")
    with K.open_checkpoint(bare) as ck:
        assert ck.family == "sd1" and not ck.unmapped
        assert ck.configs["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
        name = "unet.up_blocks.0.upsamplers.0.conv.weight"
        assert ck.ref(name).key == "model.diffusion_model.output_blocks.2.1.conv.weight"
        assert torch.equal(ck.get_canonical(name), pipes["sd1"].unet.up_blocks[0].upsamplers[0].conv.weight)
    with pytest.raises(LycoError):  # real-size architecture, tiny tensors
        K.load_pipeline(bare)
    with K.open_checkpoint(single_files["sd2"]) as ck:
        bare2 = K.write_single_file({k: ck.get(k) for k in ck.keys()}, tmp_path / "bare2.safetensors")
    with K.open_checkpoint(bare2) as ck:
        assert ck.family == "sd2"


def test_diffusers_folder_checkpoint(pipes, tmp_path):
    folder = tiny.save_tiny(pipes["sdxl"], tmp_path / "xl")
    with K.open_checkpoint(folder) as ck:
        assert ck.family == "sdxl" and ck.kind == "diffusers"
        assert ck.configs["unet"]["addition_embed_type"] == "text_time"
        for comp in C.COMPONENTS["sdxl"]:
            expect = K.canonical_state_dict(pipes["sdxl"].components[comp], comp)
            assert set(ck.names(comp)) == set(expect)
            for name in list(expect)[:40]:
                assert torch.equal(ck.get_canonical(name), expect[name])
        assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight" in ck.mapping
        assert all(k.split(".")[0] in C.COMPONENTS["sdxl"] for k in ck.keys())
    again = K.load_pipeline(folder)
    a, b = pipes["sdxl"].unet.state_dict(), again.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sd2 = tiny.save_tiny(pipes["sd2"], tmp_path / "sd2")
    with K.open_checkpoint(sd2) as ck:
        assert ck.family == "sd2"


def test_dtype_on_write_and_load(pipes, tmp_path):
    path = K.to_single_file(pipes["sd1"], tmp_path / "half.safetensors", dtype=torch.float16,
                            extra_configs={"tokenizer": tiny.TOKENIZER_MARKER})
    with K.open_checkpoint(path) as ck:
        assert all(ck.dtype(k) == torch.float16 for k in ck.keys())
    pipe = K.load_pipeline(path, dtype=torch.float32)
    w = pipe.unet.conv_in.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, pipes["sd1"].unet.conv_in.weight.half().float())


def test_canonical_text_encoder_names():
    te = tiny.tiny_components("sd1")["text_encoder"]
    sd = K.canonical_state_dict(te, "text_encoder")
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight" in sd
    other = tiny.tiny_components("sd1", seed=5)["text_encoder"]
    K.load_canonical_state_dict(other, "text_encoder", sd)
    assert all(torch.equal(a, b) for a, b in zip(te.state_dict().values(), other.state_dict().values()))
    with pytest.raises(UnknownKeys):
        K.load_canonical_state_dict(other, "text_encoder", {"text_encoder.text_model.bogus.weight": torch.zeros(1)})


# --- writing --------------------------------------------------------------------------------

def test_write_single_file_formats(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "i64": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "strided": torch.randn(4, 6).t(),
    }
    path = K.write_single_file(tensors, tmp_path / "x.safetensors", {"a": "1", "lyco.test": "ß"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"a": "1", "lyco.test": "ß"}
        assert set(f.keys()) == set(tensors)
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and torch.equal(got, t), k
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_write_single_file_is_atomic(tmp_path):
    path = tmp_path / "out.safetensors"
    K.write_single_file({"a": torch.ones(2)}, path)
    before = path.read_bytes()

    def boom():
        yield "b", torch.zeros(3)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        K.write_single_file(boom(), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]
    with pytest.raises(FormatError):
        K.write_single_file([("a", torch.ones(1)), ("a", torch.ones(1))], tmp_path / "dup.safetensors")
    with pytest.raises(FormatError):
        K.write_single_file({"m": torch.empty(2, device="meta")}, tmp_path / "meta.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


# --- legacy pickles -------------------------------------------------------------------------

def test_legacy_ckpt_with_plain_tensors_loads(single_files, tmp_path):
    with K.open_checkpoint(single_files["sd2"]) as ck:
        sd = {k: ck.get(k) for k in ck.keys()}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 7}, path)
    with K.open_checkpoint(path, family="sd2") as ck:
        assert ck.kind == "pickle" and ck.family == "sd2"
        name = "text_encoder.text_model.encoder.layers.0.self_attn.v_proj.bias"
        ref = ck.ref(name)
        assert ref.rows == (64, 96)
        assert torch.equal(ck.get_canonical(name), sd[ref.key][64:96])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_malicious_pickle_is_refused(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": _Evil(str(marker))}, path)
    with pytest.raises(UnsafeFile) as e:
        K.open_checkpoint(path)
    assert "safetensors" in str(e.value) and str(path) in str(e.value)
    with pytest.raises(UnsafeFile):
        K.load_pipeline(path)
    assert not marker.exists()


def test_bad_inputs(tmp_path):
    with pytest.raises(FormatError):
        K.open_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(FormatError):
        K.open_checkpoint(tmp_path / "x.txt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(FormatError):
        K.open_checkpoint(tmp_path / "junk.safetensors")
    (tmp_path / "junk.ckpt").write_bytes(b"not a pickle")
    with pytest.raises(LycoError):
        K.open_checkpoint(tmp_path / "junk.ckpt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FormatError):
        K.open_checkpoint(tmp_path / "folder")

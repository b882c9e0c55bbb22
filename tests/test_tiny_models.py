"""The built-in tiny SD1/SD2/SDXL models: offline, deterministic, real block structure."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from lyco.models import configs as C
from lyco.models import tiny

FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny models are latency-bound: one thread is ~10× faster than two busy ones.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipes():
    return {f: tiny.tiny_pipeline(f, seed=0) for f in FAMILIES}


@pytest.fixture(scope="module")
def real():
    return {f: C.build_components(f, device="meta") for f in FAMILIES}


def _leaf_names(module, types=(torch.nn.Linear, torch.nn.Conv2d)):
    return {n: type(m).__name__ for n, m in module.named_modules() if isinstance(m, types)}


def _abstract(names, pattern=r"\d+"):
    return {re.sub(pattern, "#", n) for n in names}


# --- tokenizer ------------------------------------------------------------------------------

def test_tokenizer_is_offline_clip_bpe():
    tok = tiny.tiny_tokenizer()
    ids = tok("A photo of the CAT, 42!").input_ids
    toks = tok.convert_ids_to_tokens(ids)
    assert toks == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "the</w>", "cat</w>", ",</w>",
                    "4</w>", "2</w>", "!</w>", "<|endoftext|>"]
    vocab, merges = tiny.tiny_vocab()
    # specials are the two highest ids, like the real CLIP vocabulary
    assert tok.bos_token_id == len(vocab) - 2 and tok.eos_token_id == len(vocab) - 1
    assert tok.model_max_length == 77
    padded = tok("cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[-1] == tok.pad_token_id == tok.eos_token_id
    # every byte is representable (no unknown tokens for arbitrary text)
    assert tok.unk_token_id not in tok("ünïcödé ☃ ~|").input_ids[1:-1]


def test_tokenizer_assets_match_code(tmp_path):
    vocab, merges = tiny.tiny_vocab()
    assert json.loads(tiny.VOCAB_ASSET.read_text(encoding="utf-8")) == vocab
    lines = [l for l in tiny.MERGES_ASSET.read_text(encoding="utf-8").splitlines() if l]
    assert lines[0].startswith("#version") and lines[1:] == merges
    vp, mp = tiny.write_tiny_tokenizer_files(tmp_path)
    assert json.loads(vp.read_text(encoding="utf-8")) == vocab
    assert mp.read_text(encoding="utf-8").splitlines()[1:] == merges


# --- structure ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_unet_has_the_real_block_structure(pipes, real, family):
    real = _leaf_names(real[family]["unet"])
    small = _leaf_names(pipes[family].unet)
    # every tiny Linear/Conv2d exists in the real UNet with the same type …
    assert set(small) <= set(real)
    assert all(real[n] == t for n, t in small.items())
    if family == "sdxl":
        # … and the real one only adds deeper transformer blocks (depth (1,2,10) → (1,2,2))
        extra = set(real) - set(small)
        assert extra and all(int(re.search(r"transformer_blocks\.(\d+)\.", n).group(1)) >= 2 for n in extra)
        assert _abstract(real) == _abstract(small)
    else:
        assert set(real) == set(small)
    proj = "Conv2d" if family == "sd1" else "Linear"
    assert small["down_blocks.1.attentions.0.proj_in"] == proj


def test_block_types_and_attention_placement():
    sd1 = tiny.tiny_configs("sd1")["unet"]
    assert sd1["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert sd1["layers_per_block"] == 2 and not sd1.get("use_linear_projection", False)
    xl = tiny.tiny_configs("sdxl")["unet"]
    assert xl["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert xl["addition_embed_type"] == "text_time" and xl["use_linear_projection"]
    assert xl["transformer_layers_per_block"] == [1, 2, 2]
    sd2 = tiny.tiny_configs("sd2")
    assert sd2["unet"]["use_linear_projection"] and sd2["scheduler"]["prediction_type"] == "v_prediction"


@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoders_and_vae_follow_the_real_ones(pipes, real, family):
    comps = pipes[family].components
    real = real[family]
    for comp in C.COMPONENTS[family]:
        assert type(comps[comp]) is type(real[comp]), comp
        assert _abstract(_leaf_names(comps[comp], (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding,
                                                   torch.nn.LayerNorm, torch.nn.GroupNorm))) == \
            _abstract(_leaf_names(real[comp], (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding,
                                               torch.nn.LayerNorm, torch.nn.GroupNorm))), comp
        if comp.startswith("text_encoder"):
            assert comps[comp].config.hidden_act == real[comp].config.hidden_act
            assert comps[comp].config.max_position_embeddings == 77
    if family == "sdxl":
        te2 = comps["text_encoder_2"]
        unet = comps["unet"]
        assert unet.config.cross_attention_dim == comps["text_encoder"].config.hidden_size + te2.config.hidden_size
        assert unet.config.projection_class_embeddings_input_dim == \
            6 * unet.config.addition_time_embed_dim + te2.config.projection_dim


def test_tiny_components_keys():
    assert set(tiny.tiny_components("sd1")) == {"unet", "text_encoder"}
    assert set(tiny.tiny_components("sd2", with_vae=True)) == {"unet", "text_encoder", "vae"}


# --- determinism ----------------------------------------------------------------------------

def test_same_seed_same_weights_other_seed_other_weights(pipes):
    for family, pipe in pipes.items():
        b = tiny.tiny_components(family, seed=0)
        c = tiny.tiny_components(family, seed=4)
        for comp in b:
            sa, sb, sc = pipe.components[comp].state_dict(), b[comp].state_dict(), c[comp].state_dict()
            assert all(torch.equal(sa[k], sb[k]) for k in sa), (family, comp)
            assert not any(torch.equal(sa[k], sc[k]) for k in sa if sa[k].numel() > 1), (family, comp)
    # the global RNG is left alone
    torch.manual_seed(123)
    x = torch.rand(3)
    torch.manual_seed(123)
    tiny.tiny_components("sd1")
    assert torch.equal(torch.rand(3), x)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_zero_initialised_parameters(pipes, family):
    for comp in C.COMPONENTS[family]:
        for name, p in pipes[family].components[comp].named_parameters():
            assert p.numel() < 2 or p.std() > 0, f"{comp}.{name} is constant"
            assert p.abs().max() > 0, f"{comp}.{name} is zero"


def test_unet_output_depends_on_weights(pipes):
    fresh = tiny.tiny_components("sd1", seed=1)["unet"]  # mutated below; the fixture is shared
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0 = pipes["sd1"].unet(x, 10, ctx).sample
        y1 = fresh(x, 10, ctx).sample
        # zeroing proj_out of one attention block changes the output (no dead branches)
        fresh.down_blocks[0].attentions[0].proj_out.weight.zero_()
        y2 = fresh(x, 10, ctx).sample
    assert torch.isfinite(y0).all() and y0.std() > 1e-3
    assert (y0 - y1).abs().max() > 1e-3
    assert (y1 - y2).abs().max() > 1e-6


# --- generation -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_two_step_generation_offline(pipes, family):
    pipe = pipes[family]
    t0 = time.perf_counter()
    out = pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    elapsed = time.perf_counter() - t0
    assert out.shape == (1, 32, 32, 3)
    assert float(out.std()) > 1e-3
    again = pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert (out == again).all()
    assert elapsed < 20, f"tiny {family} generation took {elapsed:.1f}s"


def test_pipeline_classes(pipes):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    assert isinstance(pipes["sd1"], StableDiffusionPipeline) and pipes["sd1"].safety_checker is None
    assert pipes["sd1"].feature_extractor is None
    assert isinstance(pipes["sdxl"], StableDiffusionXLPipeline)
    assert type(pipes["sdxl"].text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipes["sd2"].scheduler.config.prediction_type == "v_prediction"
    assert tiny.family_of(pipes["sd2"]) == "sd2" and tiny.family_of(pipes["sdxl"]) == "sdxl"
    assert tiny.family_of(pipes["sd1"]) == "sd1"


def test_save_tiny_folder_reloads_with_diffusers(pipes, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = tiny.save_tiny(pipes["sd1"], tmp_path / "sd1")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    again = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    s1, s2 = pipes["sd1"].unet.state_dict(), again.unet.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert again.tokenizer("a cat").input_ids == pipes["sd1"].tokenizer("a cat").input_ids


# --- real configs ---------------------------------------------------------------------------

def test_real_configs_are_the_published_architectures(real):
    counts = {f: {c: sum(p.numel() for p in m.parameters()) for c, m in real[f].items()} for f in FAMILIES}
    # parameter counts of the published models
    assert counts["sd1"] == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert counts["sd2"]["unet"] == 865_910_724 and counts["sd2"]["text_encoder"] == 340_387_840
    assert counts["sdxl"]["unet"] == 2_567_463_684 and counts["sdxl"]["text_encoder_2"] == 694_659_840
    te2 = C.get_config("sdxl", "text_encoder_2")
    assert (te2["hidden_size"], te2["num_hidden_layers"], te2["num_attention_heads"], te2["projection_dim"]) == \
        (1280, 32, 20, 1280)
    assert C.get_config("sd2", "text_encoder")["num_hidden_layers"] == 23
    assert C.get_config("sd1", "text_encoder")["hidden_act"] == "quick_gelu"
    assert C.get_config("sd2", "scheduler")["prediction_type"] == "v_prediction"
    for f in FAMILIES:
        assert C.family_of_unet_config(C.get_config(f, "unet")) == f
        assert C.family_of_unet_config(tiny.tiny_configs(f)["unet"]) == f


def test_meta_build_is_fast():
    t0 = time.perf_counter()
    unet = C.build_unet("sdxl")
    assert next(unet.parameters()).device.type == "meta"
    assert time.perf_counter() - t0 < 5
    with pytest.raises(Exception):
        C.build_unet("sd3")

"""The world base without its pretrained weights: tokenizer, configs (SD1 structure, size cap),
save/load round trips, the diffusers folder ``lyco train`` reads, and the pretraining script's
CPU smoke run."""

from __future__ import annotations

import json

import pytest
import torch

from lyco.world import base, scene

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("wb") / "base.safetensors"
    comps = base.build(seed=3)
    base.save_weights(comps, path, recipe={"note": "random init"})
    return comps, path


def test_every_world_word_is_one_token():
    tok = base.tokenizer()
    vocab = tok.get_vocab()
    ids = set()
    for w in scene.world_words():
        got = tok(w, add_special_tokens=False).input_ids
        assert len(got) == 1, (w, got)
        ids.add(got[0])
    assert len(ids) == len(scene.world_words())  # distinct tokens
    # a whole caption: start, one token per word, end, padded with end tokens to 77
    text = scene.caption(scene.Attrs("star", "orange", "teal", "plain"), "zkz")
    enc = tok(text, padding="max_length", max_length=tok.model_max_length).input_ids
    words = text.split()
    assert len(enc) == 77
    assert enc[0] == vocab["<|startoftext|>"]
    assert enc[1:1 + len(words)] == [tok(w, add_special_tokens=False).input_ids[0] for w in words]
    assert set(enc[1 + len(words):]) == {vocab["<|endoftext|>"]}
    # unknown words still tokenise (bytes), never to the trigger tokens
    other = tok("zk zkzz vq", add_special_tokens=False).input_ids
    assert tok("zkz", add_special_tokens=False).input_ids[0] not in other


def test_tokenizer_assets_are_what_the_code_generates():
    vocab, merges = base.world_vocab()
    assert json.loads(base.VOCAB_ASSET.read_text(encoding="utf-8")) == vocab
    lines = [ln for ln in base.MERGES_ASSET.read_text(encoding="utf-8").splitlines() if not ln.startswith("#")]
    assert lines == merges
    assert vocab["<|endoftext|>"] == len(vocab) - 1 and vocab["<|startoftext|>"] == len(vocab) - 2


def test_configs_keep_the_sd1_structure_under_the_size_cap():
    from lyco.models import configs as C

    cfgs = base.configs()
    u = cfgs["unet"]
    assert u["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert u["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert u["cross_attention_dim"] == cfgs["text_encoder"]["hidden_size"]
    assert not u.get("use_linear_projection")
    assert C.family_of_unet_config(u) == "sd1"
    assert cfgs["vae"]["sample_size"] == scene.IMAGE_SIZE
    assert u["sample_size"] * 2 ** (len(cfgs["vae"]["block_out_channels"]) - 1) == scene.IMAGE_SIZE
    assert cfgs["text_encoder"]["vocab_size"] == base.vocab_size()
    # parameters counted from modules actually built (meta device), times 4 bytes (fp32 storage)
    unet = C.build_from_config(u, device="meta")
    proj = [m for n, m in unet.named_modules() if n.endswith("proj_in")]
    assert proj and all(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in proj)
    total = 0
    for c in base.COMPONENTS:
        total += sum(p.numel() for p in C.build_from_config(cfgs[c], device="meta").parameters())
    assert total == sum(base.count_parameters().values())
    assert total * 4 < base.SIZE_CAP_BYTES, total * 4
    assert total * 4 + 100_000 < base.FILE_CAP_BYTES, total * 4  # + room for the metadata


def test_save_load_round_trip_and_pipeline(random_weights, tmp_path):
    comps, path = random_weights
    assert path.stat().st_size < min(base.SIZE_CAP_BYTES, base.FILE_CAP_BYTES)
    loaded = base.load_components(path)
    for c in base.COMPONENTS:
        a, b = comps[c].state_dict(), loaded[c].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), c
    cfgs, recipe = base.read_metadata(path)
    assert recipe == {"note": "random init"} and cfgs["scheduler"]["prediction_type"] == "v_prediction"
    pipe = base.load_pipeline(weights=path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red circle on a white background"] * 2, num_inference_steps=2, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, scene.IMAGE_SIZE, scene.IMAGE_SIZE, 3)


def test_diffusers_folder_is_read_by_lyco(random_weights, tmp_path):
    from lyco.formats.checkpoint import load_pipeline

    comps, path = random_weights
    folder = base.save_pretrained_folder(tmp_path / "basefolder", weights=path)
    pipe = load_pipeline(folder)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    for c in base.COMPONENTS:
        a, b = comps[c].state_dict(), getattr(pipe, c).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), c
    tok = pipe.tokenizer
    assert len(tok("zkz", add_special_tokens=False).input_ids) == 1
    with pytest.raises(FileExistsError, match="basefolder"):
        base.save_pretrained_folder(folder, weights=path)


def test_missing_weights_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "WEIGHTS", tmp_path / "nowhere" / "base.safetensors")
    assert not base.is_pretrained()
    with pytest.raises(FileNotFoundError, match="lyco.world.pretrain"):
        base.load_pipeline()
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        base.load_pipeline(weights=tmp_path / "x.safetensors")


def test_a_file_without_world_metadata_is_rejected(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(p))
    with pytest.raises(ValueError, match="lyco.world.configs"):
        base.load_pipeline(weights=p)


@pytest.mark.slow
def test_pretrain_smoke_run_writes_loadable_files(tmp_path):
    from lyco.world import classifier, pretrain

    out = tmp_path / "pt"
    assert pretrain.main(["--out", str(out), "--device", "cpu", "--minutes", "1", "--smoke", "--workers", "1"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["base.safetensors", "classifier.safetensors", "log.txt", "recipe.json", "samples.png",
                     "vae_recon.png"]
    assert all((out / n).stat().st_size < 16 * 2 ** 20 for n in names)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["completed"] == "all" and "error" not in recipe["measurements"]
    assert set(recipe["stages"]) == {"vae", "unet_text_encoder", "classifier"}
    assert recipe["stages"]["unet_text_encoder"]["steps"] == 3
    pipe = base.load_pipeline(weights=out / "base.safetensors")
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red zkz on a white background", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, scene.IMAGE_SIZE, scene.IMAGE_SIZE, 3)
    assert pipe.vae.config.scaling_factor == pytest.approx(recipe["stages"]["vae"]["scaling_factor"])
    clf = classifier.load(weights=out / "classifier.safetensors")
    pred = clf.predict(scene.render_batch(scene.sample_attrs_batch(3, 0), 0))
    assert set(pred) == set(classifier.HEADS)


def test_pretraining_forward_process_is_the_schedulers():
    """The pretraining objective (noised latents and v target) equals diffusers' DDPMScheduler on the
    pipeline's own scheduler config — the one ``lyco train`` also builds its noise schedule from."""
    from diffusers import DDPMScheduler
    from lyco.models import configs as C
    from lyco.world.pretrain import noisy_and_target

    cfg = base.configs()["scheduler"]
    ddpm = DDPMScheduler.from_config(cfg)
    ddim = C.build_from_config(cfg)
    assert torch.allclose(ddpm.alphas_cumprod, ddim.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    noisy, v = noisy_and_target(x0, noise, t, ddpm.alphas_cumprod.float())
    assert torch.allclose(noisy, ddpm.add_noise(x0, noise, t), atol=1e-6)
    assert torch.allclose(v, ddpm.get_velocity(x0, noise, t), atol=1e-6)

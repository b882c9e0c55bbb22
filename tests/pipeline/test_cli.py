"""``lyco generate`` and ``lyco grid`` end to end on the built-in tiny models."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import lyco
import lyco.pipeline as lp
from lyco.cli import main
from lyco.prompt import short_hash
from _pipeline_helpers import ALGOS, PRESET_FEW, base_pipe, make_adapter_file, same_bits, snapshot


@pytest.fixture
def loras(tmp_path):
    d = tmp_path / "loras"
    d.mkdir()
    maker = base_pipe("sd1")
    make_adapter_file(maker, d / "ink.safetensors", ALGOS["lora"], seed=31, preset=PRESET_FEW,
                      metadata={"ss_output_name": "Ink, v2"})
    make_adapter_file(maker, d / "glow.safetensors", ALGOS["lokr"], seed=32, preset=PRESET_FEW)
    return d


def _png(path):
    im = Image.open(path)
    im.load()
    return np.asarray(im.convert("RGB")), im.text.get("parameters", "")


def test_generate_writes_the_image_and_a1111_parameters(loras, tmp_path, capsys):
    out = tmp_path / "cat.png"
    prompt = "a photo of a cat, <lora:ink:0.8:0.6>, (fluffy:1.2)"
    rc = main(["generate", "--model", "tiny:sd1", "--prompt", prompt, "--negative", "blurry",
               "--adapter-dir", str(loras), "--seed", "7", "--steps", "2", "--size", "32x32", "--guidance", "5",
               "-o", str(out)])
    assert rc == 0
    cap = capsys.readouterr()
    assert "seed 7" in cap.out and "Ink, v2" in cap.out
    assert "generate" in cap.err  # the tqdm bar
    pixels, text = _png(out)
    assert pixels.shape == (32, 32, 3)
    p, neg, params = lp.parse_infotext(text)
    assert p == prompt and neg == "blurry"
    assert params["Steps"] == "2" and params["Seed"] == "7" and params["Size"] == "32x32"
    assert params["CFG scale"] == "5" and params["Sampler"] == "PLMS" and params["Model"] == "tiny:sd1"
    assert params["Lora hashes"] == f"Ink v2: {short_hash(loras / 'ink.safetensors')}"
    assert short_hash(loras / "ink.safetensors") == lyco.load(loras / "ink.safetensors").metadata["sshs_model_hash"][:12]
    assert 'Lora hashes: "Ink v2: ' in text
    # the same image as the library call on a fresh tiny pipeline
    pipe = base_pipe("sd1")
    g = lp.generate(pipe, prompt, negative="blurry", adapter_dirs=[loras], seed=7, steps=2, size=(32, 32),
                    guidance=5, progress=False)
    assert g.prompt == "a photo of a cat, (fluffy:1.2)"
    assert np.array_equal(np.asarray(g.image), pixels)
    base = lp.generate(base_pipe("sd1"), "a photo of a cat, (fluffy:1.2)", negative="blurry", seed=7, steps=2,
                       size=(32, 32), guidance=5, progress=False)
    assert not np.array_equal(np.asarray(base.image), pixels), "the adapter must show in the image"


def test_generate_from_a_single_file_with_adapter_option(loras, tmp_path, capsys):
    from lyco.models.tiny import save_tiny_single_file
    model = save_tiny_single_file(base_pipe("sd1"), tmp_path / "tiny_sd1.safetensors")
    out = tmp_path / "x.png"
    glow = loras / "glow.safetensors"
    rc = main(["generate", "--model", str(model), "--prompt", "a cat", "--adapter", f"{glow}:0.5",
               "--seed", "3", "--steps", "2", "--size", "32x32", "--dtype", "fp32", "--device", "cpu",
               "--no-progress", "--fuse", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    _, text = _png(out)
    p, _neg, params = lp.parse_infotext(text)
    assert p == "a cat <lora:glow:0.5>"  # pasting this into A1111 reproduces the adapter
    assert params["Model"] == "tiny_sd1" and len(params["Model hash"]) == 10
    assert params["Lora hashes"] == f"glow: {short_hash(glow)}"
    assert params["Version"].startswith("lyco ")

    # output exists: refused without --overwrite, replaced with it
    rc = main(["generate", "--model", "tiny:sd1", "--prompt", "a cat", "-o", str(out), "--steps", "1"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    rc = main(["generate", "--model", "tiny:sd1", "--prompt", "a dog", "-o", str(out), "--steps", "1",
               "--size", "32x32", "--overwrite", "--no-progress"])
    assert rc == 0 and lp.parse_infotext(_png(out)[1])[0] == "a dog"
    assert not any(p.name.startswith(".x.png") for p in tmp_path.iterdir()), "no temporary file left"


def test_generate_unknown_adapter_is_a_clear_error(loras, tmp_path, capsys):
    rc = main(["generate", "--model", "tiny:sd1", "--prompt", "a cat <lora:inc:1>", "--adapter-dir", str(loras),
               "--steps", "1", "-o", str(tmp_path / "y.png")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no adapter named 'inc'" in err and "did you mean 'ink'" in err and "Traceback" not in err
    assert not (tmp_path / "y.png").exists()
    rc = main(["generate", "--model", "tiny:sd1", "--prompt", "a cat <lora:ink:x>", "--adapter-dir", str(loras),
               "-o", str(tmp_path / "y.png")])
    assert rc == 2 and "te must be a number" in capsys.readouterr().err
    rc = main(["generate", "--model", "tiny:sd1", "--prompt", "a", "--size", "33x32", "-o", str(tmp_path / "y.png")])
    assert rc == 2 and "multiples of 8" in capsys.readouterr().err


def test_grid_one_adapter(loras, tmp_path, capsys):
    out = tmp_path / "grid.png"
    ws = [0.0, 0.5, 1.0]
    rc = main(["grid", "--model", "tiny:sd1", "--adapter", str(loras / "ink.safetensors"), "--weights", "0,0.5,1",
               "--prompts", "a cat", "a dog on a hill", "--seeds", "5", "--steps", "2", "--size", "32x32",
               "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    pixels, text = _png(out)
    assert pixels.shape[1] > 3 * 32 and pixels.shape[0] > 2 * 32
    assert (pixels == 255).all(axis=2).mean() > 0.1 and (pixels < 100).any(), "white margins with dark labels"
    _, _, params = lp.parse_infotext(text)
    assert params["Grid"] == "Ink, v2 x 0,0.5,1" and params["Seeds"] == "5"
    assert params["Lora hashes"] == f"Ink v2: {short_hash(loras / 'ink.safetensors')}"

    # the library call: cells are the plain generations at each weight, same seed per row,
    # and the pipeline is left exactly as it was
    pipe = base_pipe("sd1")
    before = snapshot(pipe)
    g = lp.grid(pipe, loras / "ink.safetensors", ws, ["a cat", "a dog on a hill"], [5], steps=2, size=(32, 32),
                progress=False)
    assert same_bits(before, snapshot(pipe)) and len(lp.adapters(pipe)) == 0
    assert g.col_labels == ["Ink, v2: 0", "Ink, v2: 0.5", "Ink, v2: 1"]
    assert len(g.cells) == 2 and all(len(r) == 3 for r in g.cells)
    assert g.image.size == Image.open(out).size
    plain = lp.generate(base_pipe("sd1"), "a dog on a hill", seed=5, steps=2, size=(32, 32), progress=False)
    assert np.array_equal(np.asarray(g.cells[1][0]), np.asarray(plain.image))  # weight 0 = base model
    one = base_pipe("sd1")
    lp.load(one, loras / "ink.safetensors", 0.5)
    at_half = lp.generate(one, "a cat", seed=5, steps=2, size=(32, 32), progress=False)
    assert np.array_equal(np.asarray(g.cells[0][1]), np.asarray(at_half.image))
    assert not np.array_equal(np.asarray(g.cells[0][1]), np.asarray(g.cells[0][2]))


def test_grid_two_adapters_against_each_other(loras, tmp_path, capsys):
    out = tmp_path / "ab.png"
    rc = main(["grid", "--model", "tiny:sdxl", "--adapter", str(loras / "ink.safetensors"), "--weights", "0,1",
               "--adapter2", str(loras / "glow.safetensors"), "--weights2", "0,0.5,1", "--prompts", "a cat",
               "--seeds", "1", "2", "--steps", "1", "-o", str(out), "--no-progress", "--allow-unmatched"])
    # SD1 adapters on an SDXL model do not fit: a clear error, even with --allow-unmatched
    # (modules that exist under the same name have other shapes)
    err = capsys.readouterr().err
    assert rc == 2 and "sd1" in err and "sdxl" in err
    rc = main(["grid", "--model", "tiny:sd1", "--adapter", str(loras / "ink.safetensors"), "--weights", "0,1",
               "--adapter2", str(loras / "glow.safetensors"), "--weights2", "0,0.5,1", "--prompts", "a cat",
               "--seeds", "1", "2", "--steps", "1", "--size", "32x32", "-o", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "6 rows x 2 columns" in capsys.readouterr().out
    _, text = _png(out)
    params = lp.parse_infotext(text)[2]
    assert params["Grid"] == "Ink, v2 x 0,1; glow y 0,0.5,1" and params["Seeds"] == "1,2"
    assert set(params["Lora hashes"].split(", ")) == {f"Ink v2: {short_hash(loras / 'ink.safetensors')}",
                                                      f"glow: {short_hash(loras / 'glow.safetensors')}"}
    rc = main(["grid", "--model", "tiny:sd1", "--adapter", str(loras / "ink.safetensors"), "--weights", "0,a",
               "--prompts", "x", "-o", str(tmp_path / "z.png")])
    assert rc == 2 and "weights must be numbers" in capsys.readouterr().err

"""A plain LoRA file gives the same images through lyco as through diffusers' own loader
(``load_lora_weights`` + ``set_adapters``), on the same pipeline weights and seed.

The LoRA files are made by lyco (``lyco.create(pipe, algo="lora", preset="attn-mlp")`` with random
non-zero tensors, saved in kohya format: diffusers UNet names for SD1, LDM names for SDXL), so
diffusers exercises its kohya conversion and its own PEFT forward: an independent reference.
"""

from __future__ import annotations

import logging

import pytest

import lyco
import lyco.pipeline as lp
from _pipeline_helpers import assert_close, base_pipe, differ, randomise, run


def _lora_file(pipe, path, seed):
    net = lyco.create(pipe, algo="lora", rank=4, alpha=2.0, preset="attn-mlp", seed=seed)
    randomise(net, seed)
    n = len(net.layers)
    net.save(str(path))
    net.detach()
    return path, n


def _quiet():
    for name in ("diffusers", "peft", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # diffusers' second adapter
def test_sd1_two_loras_match_diffusers_set_adapters(tmp_path):
    _quiet()
    ours, theirs = base_pipe("sd1"), base_pipe("sd1")
    fa, na = _lora_file(ours, tmp_path / "a.safetensors", 1)
    fb, nb = _lora_file(ours, tmp_path / "b.safetensors", 2)
    y0 = run(ours)
    assert lp.load(ours, fa, 0.7).network.layers.__len__() == na
    lp.load(ours, fb, -0.4)
    y_ours = run(ours)

    theirs.load_lora_weights(str(fa), adapter_name="a")
    theirs.load_lora_weights(str(fb), adapter_name="b")
    theirs.set_adapters(["a", "b"], [0.7, -0.4])
    y_theirs = run(theirs)
    assert differ(y_ours, y0) > 0.05
    assert_close(y_ours, y_theirs, 2e-4, "lyco vs diffusers, two LoRAs")

    # one adapter alone, and fused on both sides
    lp.disable(ours, "b")
    theirs.set_adapters(["a"], [0.7])
    assert_close(run(ours), run(theirs), 2e-4, "lyco vs diffusers, one LoRA")
    lp.fuse(ours)
    theirs.fuse_lora(adapter_names=["a"])
    assert_close(run(ours), run(theirs), 2e-4, "lyco vs diffusers, fused")


def test_sdxl_lora_matches_diffusers(tmp_path):
    _quiet()
    ours, theirs = base_pipe("sdxl"), base_pipe("sdxl")
    f, n = _lora_file(ours, tmp_path / "xl.safetensors", 3)
    y0 = run(ours)
    e = lp.load(ours, f, 0.8)
    assert len(e.network.layers) == n and e.adapter.family == "sdxl"
    assert any(name.startswith("text_encoder_2.") for name in e.adapter.modules)
    y_ours = run(ours)
    theirs.load_lora_weights(str(f), adapter_name="xl")
    theirs.set_adapters(["xl"], [0.8])
    y_theirs = run(theirs)
    assert differ(y_ours, y0) > 0.05
    assert_close(y_ours, y_theirs, 2e-4, "lyco vs diffusers, SDXL LoRA")

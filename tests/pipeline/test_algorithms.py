"""Every algorithm in a diffusers pipeline: on the fly == fused == merged into the weights.

For each algorithm a random (non-zero) adapter is created on the tiny SD1 pipeline (k×k and 1×1
UNet convs, attention and MLP Linears, text-encoder layers: ``PRESET_SOME``), written to a file
and read back. The generation with the file attached on the fly must equal the generation
after ``fuse()`` and the generation of an independent copy of the pipeline whose weights were
merged with ``Adapter.merge_into`` and the generation of the single-file tiny checkpoint merged by
``lyco merge`` (fp32, so a tight tolerance), while differing clearly from the base model;
``unfuse()`` must give back the original weights bit for bit.
"""

from __future__ import annotations

import pytest

import lyco
import lyco.pipeline as lp
from _pipeline_helpers import ALGOS, PRESET_FEW, PRESET_SOME, assert_close, base_pipe, differ, make_adapter_file, run, same_bits, snapshot

UNET_M, TE_M = 0.8, 0.6


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    from lyco.models.tiny import save_tiny_single_file
    return save_tiny_single_file(base_pipe("sd1"), tmp_path_factory.mktemp("ckpt") / "tiny_sd1.safetensors")


@pytest.mark.parametrize("name", list(ALGOS))
def test_on_the_fly_equals_fused_equals_merged(name, tmp_path, single_file):
    pipe = base_pipe("sd1")
    # BOFT gets fewer layers: validating its shapes on the meta device costs ~60 ms per layer
    preset = PRESET_FEW if name == "boft" else PRESET_SOME
    f = make_adapter_file(pipe, tmp_path / f"{name}.safetensors", ALGOS[name], seed=3, preset=preset)
    before = snapshot(pipe)
    y_base = run(pipe)

    e = lp.load(pipe, f, multiplier=UNET_M, te_multiplier=TE_M)
    assert e.name == name and len(e.network.layers) == (105 if preset is PRESET_SOME else 38)
    algos = lyco.load(f).algos()
    assert name.split("-")[0].replace("locon", "lora").replace("dora", "lora") in "".join(algos)
    y_fly = run(pipe)
    lp.fuse(pipe)
    assert not same_bits(before, snapshot(pipe)), "fuse must change the weights"
    y_fused = run(pipe)
    lp.unfuse(pipe)
    assert same_bits(before, snapshot(pipe)), "unfuse must restore the weights bit for bit"
    lp.remove(pipe, name)
    assert same_bits(before, snapshot(pipe))

    merged = base_pipe("sd1")
    unmatched = lyco.load(f).merge_into(merged, multiplier=UNET_M, te_multiplier=TE_M)
    assert unmatched == []
    y_merged = run(merged)

    from lyco.cli import main
    from lyco.formats.checkpoint import load_pipeline
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(single_file), f"{f}:{UNET_M}:{TE_M}", "-o", str(out)]) == 0
    cli_merged = load_pipeline(out)
    cli_merged.set_progress_bar_config(disable=True)
    y_cli = run(cli_merged)

    effect = differ(y_fly, y_base)
    assert effect > 0.05, f"{name}: the adapter barely changes the output ({effect:.3g})"
    tol = max(2e-4, 1e-4 * effect)
    assert_close(y_fused, y_fly, tol, f"{name}: fused vs on the fly")
    assert_close(y_merged, y_fly, tol, f"{name}: merge_into vs on the fly")
    assert_close(y_cli, y_fly, tol, f"{name}: lyco merge (single file) vs on the fly")

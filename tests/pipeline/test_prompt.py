"""The A1111 prompt syntax: every tag form, tag removal, name lookup (stem, alias, suggestions),
and prompts driving the adapters of a pipeline."""

from __future__ import annotations

import os

import pytest
import torch

import lyco
import lyco.pipeline as lp
from lyco.errors import LycoError
from lyco.formats.safetensors_io import save_tensors
from lyco.prompt import AdapterIndex, PromptError, find_tags, parse, parse_tag, read_header_metadata, short_hash
from _pipeline_helpers import ALGOS, PRESET_FEW, assert_close, base_pipe, make_adapter_file, run, same_bits, snapshot


def _w(tag):
    return (tag.name, tag.te, tag.unet, tag.dyn)


@pytest.mark.parametrize("text, expected", [
    ("<lora:foo>", ("foo", 1.0, 1.0, None)),
    ("<lora:foo:0.6>", ("foo", 0.6, 0.6, None)),               # missing UNET weight = TE weight
    ("<lora:foo:0.6:0.9>", ("foo", 0.6, 0.9, None)),
    ("<lora:foo:0.6:0.9:8>", ("foo", 0.6, 0.9, 8)),
    ("<lora:foo:-1.5:.25>", ("foo", -1.5, 0.25, None)),
    ("<lyco:foo:0.5>", ("foo", 0.5, 0.5, None)),
    ("<LyCo:foo:0.5>", ("foo", 0.5, 0.5, None)),
    ("<lora:foo:te=0.3>", ("foo", 0.3, 0.3, None)),
    ("<lora:foo:unet=0.3>", ("foo", 1.0, 0.3, None)),
    ("<lora:foo:unet=0.2:te=0.7:dyn=4>", ("foo", 0.7, 0.2, 4)),
    ("<lora:foo:0.8:dyn=16>", ("foo", 0.8, 0.8, 16)),
    ("<lora:foo:0.8:unet=0.1>", ("foo", 0.8, 0.1, None)),
    ("<lora:foo:0.8:0.5:te=0.2>", ("foo", 0.2, 0.5, None)),      # named wins, as in A1111
    ("<lora:my style v2.1 (final):0.5>", ("my style v2.1 (final)", 0.5, 0.5, None)),
    ("<lora: spaced :0.5>", ("spaced", 0.5, 0.5, None)),
])
def test_tag_forms(text, expected):
    tags = find_tags(f"a cat {text} on a mat")
    assert len(tags) == 1 and _w(tags[0]) == expected
    assert tags[0].text == text
    again = parse_tag(tags[0].kind, tags[0].as_tag()[len(tags[0].kind) + 2:-1])
    assert _w(again) == expected


@pytest.mark.parametrize("text, match", [
    ("<lora:>", "no adapter name"),
    ("<lora::0.5>", "no adapter name"),
    ("<lora:foo:abc>", "te must be a number"),
    ("<lora:foo:1:x>", "unet must be a number"),
    ("<lora:foo:1:1:2.5>", "whole number"),
    ("<lora:foo:1:1:0>", "at least 1"),
    ("<lora:foo:1:1:1:1>", "too many"),
    ("<lora:foo:strength=1>", "unknown parameter 'strength'"),
    ("<lora:foo:te=1:te=2>", "given twice"),
    ("<lora:foo:nan>", "finite"),
])
def test_bad_tags_are_clear_errors(text, match):
    with pytest.raises(PromptError, match=match):
        parse(f"a cat {text}")


@pytest.mark.parametrize("prompt, clean", [
    ("a cat <lora:x:0.5> on a mat", "a cat on a mat"),
    ("a cat, <lora:x>, on a mat", "a cat, on a mat"),
    ("<lora:a> <lyco:b:0.2:0.3:4>, a cat", "a cat"),
    ("a cat, <lora:x>", "a cat"),
    ("a cat,<lora:x>,on a mat", "a cat, on a mat"),
    ("a cat<lora:x:1>", "a cat"),
    ("(<lora:x> red:1.2) cat", "(red:1.2) cat"),
    ("<lora:x>", ""),
    ("no tags,  here  (left:1.1)  alone ", "no tags,  here  (left:1.1)  alone "),
])
def test_tags_are_removed_and_gaps_tidied(prompt, clean):
    assert parse(prompt)[0] == clean


def test_the_rest_of_the_prompt_is_untouched():
    rest = "((masterpiece:1.2), (a (very:1.1) (nested:0.9) cat:1.3)), [dog|cat], [from:to:0.5], <hypernet:h:1>, \\(x\\)"
    clean, tags = parse(f"{rest} <lora:x:0.5>, <lyco:y:1:0.2>")
    assert clean == rest
    assert [t.name for t in tags] == ["x", "y"]
    clean, tags = parse(f"<lora:x:0.5> {rest}")
    assert clean == rest and len(tags) == 1
    assert parse(rest) == (rest, [])


def _fake_adapter(path, **metadata):
    t = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(1, 4),
         "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(4, 1)}
    save_tensors(t, path, {k: str(v) for k, v in metadata.items()})
    return path


def test_index_finds_stems_and_aliases_and_suggests(tmp_path):
    d1, d2 = tmp_path / "loras", tmp_path / "lycoris"
    (d1 / "sub").mkdir(parents=True)
    d2.mkdir()
    _fake_adapter(d1 / "watercolor_v2.safetensors", ss_output_name="Watercolor Style")
    _fake_adapter(d1 / "sub" / "pixel.safetensors")
    _fake_adapter(d2 / "pixel.safetensors", ss_output_name="px")            # stem taken by d1: d1 wins
    _fake_adapter(d2 / "a.safetensors", ss_output_name="shared")
    _fake_adapter(d2 / "b.safetensors", ss_output_name="shared")
    _fake_adapter(d2 / "c.safetensors", ss_output_name="pixel")              # an alias never hides a stem
    (d2 / "notes.txt").write_text("not an adapter")
    idx = AdapterIndex([d1, d2])
    assert idx.resolve("watercolor_v2").path == d1 / "watercolor_v2.safetensors"
    assert idx.resolve("Watercolor Style").path == d1 / "watercolor_v2.safetensors"
    assert idx.resolve("watercolor style").path == d1 / "watercolor_v2.safetensors"  # unique case-insensitive
    assert idx.resolve("pixel").path == d1 / "sub" / "pixel.safetensors"
    assert idx.resolve("px").path == d2 / "pixel.safetensors"
    assert idx.resolve("watercolor_v2").display_name == "Watercolor Style"
    with pytest.raises(LycoError, match="several files have this alias"):
        idx.resolve("shared")
    with pytest.raises(LycoError, match=r"no adapter named 'watercolour_v2'.*did you mean 'watercolor_v2'"):
        idx.resolve("watercolour_v2")
    with pytest.raises(LycoError, match=r"no adapter named 'zzzz' in .*loras.*lycoris$"):
        idx.resolve("zzzz")
    _fake_adapter(d2 / "late.safetensors")  # added after the scan: found on a miss
    assert idx.resolve("late").stem == "late"
    with pytest.raises(LycoError, match="does not exist"):
        AdapterIndex([tmp_path / "nope"])


def test_headers_and_hashes_are_cached_and_a1111_compatible(tmp_path):
    from lyco.formats.metadata import addnet_hash_of_file
    f = _fake_adapter(tmp_path / "x.safetensors", ss_output_name="ex")
    h = addnet_hash_of_file(f)
    assert short_hash(f) == h[:12]  # no sshs_model_hash: the file's data hash
    g = _fake_adapter(tmp_path / "y.safetensors", sshs_model_hash="ABCDEF0123456789" * 4)
    assert short_hash(g) == "abcdef012345"
    md = read_header_metadata(f)
    assert md["ss_output_name"] == "ex"
    assert read_header_metadata(f) is md  # cached
    os.utime(f, ns=(1, 1))
    assert read_header_metadata(f) is not md  # re-read when the file changes


def test_prompt_drives_the_pipeline_adapters(sd1, tmp_path):
    d = tmp_path / "loras"
    d.mkdir()
    fa = make_adapter_file(sd1, d / "style_a.safetensors", ALGOS["lora"], seed=21, preset=PRESET_FEW,
                           metadata={"ss_output_name": "Style A"})
    fb = make_adapter_file(sd1, d / "b.safetensors", ALGOS["loha"], seed=22, preset=PRESET_FEW)
    before = snapshot(sd1)
    y0 = run(sd1)
    reg = lp.adapters(sd1)

    r = lp.apply_prompt(sd1, "a photo of a cat <lora:style_a:0.5:0.9>, <lyco:b:0.3>", [d])
    assert r.prompt == "a photo of a cat" and r.names == ["Style A", "b"]
    assert [(e["name"], e["te"], e["unet"], e["enabled"]) for e in reg.list()] == [
        ("Style A", 0.5, 0.9, True), ("b", 0.3, 0.3, True)]
    y_tags = run(sd1, r.prompt)
    ref = base_pipe("sd1")
    lp.load(ref, fa, multiplier=0.9, te_multiplier=0.5)
    lp.load(ref, fb, multiplier=0.3)
    assert torch.equal(run(ref), y_tags)
    assert reg.hashes() == {"Style A": short_hash(fa), "b": short_hash(fb)}
    assert short_hash(fa) == lyco.load(fa).metadata["sshs_model_hash"][:12]

    # a later prompt: the alias finds the same file (no second copy), b is switched off
    r = lp.apply_prompt(sd1, "<lora:Style A:1>a photo of a cat", [d])
    assert r.prompt == "a photo of a cat" and len(reg) == 2
    assert [(e["name"], e["unet"], e["enabled"]) for e in reg.list()] == [("Style A", 1.0, True), ("b", 0.3, False)]
    # a prompt without tags switches every prompt-loaded adapter off: the base model again
    lp.apply_prompt(sd1, "a photo of a cat", [d])
    assert torch.equal(run(sd1), y0)
    # but adapters loaded by hand stay as they are
    lp.load(sd1, fb, 0.2, name="manual")
    lp.apply_prompt(sd1, "a photo of a cat", [d])
    assert reg["manual"].enabled
    reg.remove("manual")

    state = reg.list()
    with pytest.raises(LycoError, match=r"no adapter named 'style_b'.*did you mean 'style_a'"):
        lp.apply_prompt(sd1, "a cat <lora:b:0.9> <lora:style_b:1>", [d])
    assert reg.list() == state, "a prompt with an unknown name changes nothing"
    with pytest.warns(UserWarning, match="more than one tag"):
        r = lp.apply_prompt(sd1, "<lora:b:0.1> cat <lora:b:0.6>", [d])
    assert reg["b"].unet == 0.6
    reg.clear()
    assert same_bits(before, snapshot(sd1))


def test_dyn_in_a_tag(sd1, tmp_path):
    d = tmp_path / "loras"
    d.mkdir()
    f = make_adapter_file(sd1, d / "r4.safetensors", dict(algo="lora", rank=4, alpha=4.0), seed=23,
                          preset=PRESET_FEW)
    lp.apply_prompt(sd1, "a cat <lora:r4:1:1:2>", [d])
    assert lp.adapters(sd1)["r4"].dyn == 2
    y = run(sd1)
    ref = base_pipe("sd1")
    lp.load(ref, f, dyn=2)
    assert torch.equal(run(ref), y)
    lp.apply_prompt(sd1, "a cat <lora:r4:1>", [d])
    assert lp.adapters(sd1)["r4"].dyn is None
    lp.remove(ref, "r4")
    lp.load(ref, f)
    assert_close(run(sd1), run(ref), 0.0, "dyn removed again")

"""lyco merge: the merged checkpoint computes what the base computes with the adapters attached."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import lyco
from lyco.adapter import Adapter, ModuleAdapter
from lyco.cli import main
from lyco.errors import ConfigError, FamilyMismatch, UnknownKeys
from lyco.formats.checkpoint import load_pipeline
from lyco.tools import merge
from lyco.tools import _common

from _tools_common import assert_outputs_close, assert_outputs_differ, forwards, sha

# (family, checkpoint kind, [(algo key, unet weight, te weight)])
CASES = [
    ("sd1", "single", [("lora", 0.8, 0.5), ("loha-dora", 1.0, None), ("diag-oft", 0.7, 1.0), ("ia3", 1.0, 0.6)]),
    ("sd1", "folder", [("lokr", 0.9, 0.4), ("norm", 1.0, None)]),
    ("sdxl", "single", [("lora", 0.7, 0.9), ("lora-dora", 1.0, 0.5)]),
    ("sdxl", "folder", [("glora", 0.5, 1.0), ("full", 1.0, 0.3)]),
]


@pytest.mark.parametrize("family,kind,adapters", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_merged_checkpoint_equals_base_with_adapters_attached(family, kind, adapters, pipes, ckpts, algo_files,
                                                              tmp_path):
    base = ckpts[family][kind]
    before = sha(base)
    files = [algo_files[(family, k)] for k, _, _ in adapters]
    specs = [f"{f}:{w}" + (f":{tw}" if tw is not None else "") for f, (_, w, tw) in zip(files, adapters)]
    out = tmp_path / ("merged.safetensors" if kind == "single" else "merged")
    rep = merge(base, specs, out, progress=False, verbose=False)
    assert rep["unmatched"] == {} and rep["tensors_changed"] > 0
    assert rep["modules"] == sum(len(lyco.load(f)) for f in files)
    assert sha(base) == before  # the input is never modified

    pipe = pipes[family]
    ref0 = forwards(pipe, family)
    handles = [lyco.load(f).attach(pipe, multiplier=w, te_multiplier=tw) for f, (_, w, tw) in zip(files, adapters)]
    try:
        ref = forwards(pipe, family)
    finally:
        for h in handles:
            h.detach()
    merged = load_pipeline(out, dtype=torch.float64)  # (diffusers would load a folder's UNet as fp32)
    got = forwards(merged, family)
    assert_outputs_differ(ref0, ref, ["unet", "te"] + (["te2"] if family == "sdxl" else []))
    assert_outputs_close(ref, got)
    if kind == "single":
        with safe_open(str(out), "pt") as f, safe_open(str(base), "pt") as g:
            assert set(f.keys()) == set(g.keys())  # same layout, every key kept
            assert json.loads(f.metadata()["lyco.merge"])[0]["weight"] == adapters[0][1]
            assert f.metadata()["lyco.configs"] == g.metadata()["lyco.configs"]
    else:
        assert (out / "model_index.json").is_file() and (out / "tokenizer").is_dir()


def test_merge_streams_untouched_tensors_without_decoding(ckpts, algo_files, tmp_path, monkeypatch):
    read, raw = [], []
    orig_read, orig_raw = _common.TensorReader.read, _common.TensorReader.copy_raw
    monkeypatch.setattr(_common.TensorReader, "read", lambda self, k, rows=None: read.append(k) or orig_read(self, k, rows))
    monkeypatch.setattr(_common.TensorReader, "copy_raw", lambda self, k, o: raw.append(k) or orig_raw(self, k, o))
    a = lyco.load(algo_files[("sdxl", "lora")])
    rep = merge(ckpts["sdxl"]["single"], [a], tmp_path / "m.safetensors", progress=False, verbose=False)
    # every touched tensor read once (fused q/k/v: one read for three modules), nothing else decoded
    assert len(read) == len(set(read)) and 0 < len(read) <= rep["tensors_changed"]
    assert any("in_proj_weight" in k for k in read)
    with safe_open(str(ckpts["sdxl"]["single"]), "pt") as f:
        assert len(read) + len(raw) == len(list(f.keys()))


def test_dtype_casts_once_and_everything(ckpts, algo_files, tmp_path):
    base = ckpts["sd1"]["single"]
    f = algo_files[("sd1", "lora")]
    merge(base, [f], tmp_path / "m64.safetensors", progress=False, verbose=False)
    merge(base, [f], tmp_path / "m16.safetensors", dtype="fp16", progress=False, verbose=False)
    with safe_open(str(tmp_path / "m64.safetensors"), "pt") as a, safe_open(str(tmp_path / "m16.safetensors"), "pt") as b:
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert y.dtype == (torch.float16 if x.is_floating_point() else x.dtype), k
            assert torch.equal(x.to(y.dtype), y), k  # fp64 result cast once, not fp16 arithmetic


def test_every_module_must_land(ckpts, algo_files, tmp_path, capsys):
    a = lyco.load(algo_files[("sd1", "lora")])
    extra = dict(a.modules)
    extra["unet.down_blocks.9.attentions.0.proj_in"] = next(iter(a.modules.values()))
    bad = Adapter(extra, dict(a.metadata), "sd1", "bad.safetensors")
    with pytest.raises(UnknownKeys, match="down_blocks.9.attentions.0.proj_in") as e:
        merge(ckpts["sd1"]["single"], [bad], tmp_path / "m.safetensors", progress=False, verbose=False)
    assert "--allow-unmatched" in str(e.value) and "bad.safetensors" in str(e.value)
    assert not (tmp_path / "m.safetensors").exists()
    rep = merge(ckpts["sd1"]["single"], [bad], tmp_path / "m.safetensors", allow_unmatched=True, progress=False)
    assert rep["unmatched"]["bad.safetensors"] == ["unet.down_blocks.9.attentions.0.proj_in"]
    assert "down_blocks.9.attentions.0.proj_in" in capsys.readouterr().err


def test_family_mismatch(ckpts, algo_files, tmp_path):
    with pytest.raises(FamilyMismatch, match="'sd1'.*'sdxl'"):
        merge(ckpts["sdxl"]["single"], [algo_files[("sd1", "lora")]], tmp_path / "m.safetensors",
              progress=False, verbose=False)


def test_output_rules(ckpts, algo_files, tmp_path):
    f = algo_files[("sd1", "lora")]
    base = ckpts["sd1"]["single"]
    with pytest.raises(ConfigError, match="is the input"):
        merge(base, [f], base, overwrite=True, progress=False, verbose=False)
    with pytest.raises(ConfigError, match="is the input"):
        merge(base, [f], f, overwrite=True, progress=False, verbose=False)
    folder = ckpts["sd1"]["folder"]
    with pytest.raises(ConfigError, match="inside the input folder"):
        merge(folder, [f], folder / "unet" / "x", progress=False, verbose=False)
    with pytest.raises(ConfigError, match="contains the input"):
        merge(folder, [f], folder.parent, overwrite=True, progress=False, verbose=False)
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(ConfigError, match="already exists"):
        merge(base, [f], out, progress=False, verbose=False)
    assert out.read_bytes() == b"old"
    merge(base, [f], out, overwrite=True, progress=False, verbose=False)
    assert out.stat().st_size > 1000
    # a folder output replaced as a whole
    o2 = tmp_path / "folder_out"
    o2.mkdir()
    (o2 / "stale.txt").write_text("x")
    merge(folder, [f], o2, overwrite=True, progress=False, verbose=False)
    assert not (o2 / "stale.txt").exists() and (o2 / "unet" / "config.json").is_file()


def test_failed_merge_leaves_nothing(ckpts, tmp_path):
    # a module whose tensors do not fit the layer: refused before anything is written
    t = {"lora_down.weight": torch.randn(2, 5), "lora_up.weight": torch.randn(8, 2)}
    a = Adapter({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": ModuleAdapter("lora", t)}, {}, "sd1")
    with pytest.raises(lyco.ShapeMismatch):
        merge(ckpts["sd1"]["folder"], [a], tmp_path / "out", progress=False, verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_merge(ckpts, algo_files, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    rc = main(["merge", str(ckpts["sd1"]["single"]), f"{algo_files[('sd1', 'loha')]}:0.5:0.25", "-o", str(out),
               "--dtype", "bf16", "--quiet"])
    assert rc == 0 and out.is_file()
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.bfloat16
    rc = main(["merge", str(ckpts["sd1"]["single"]), str(algo_files[("sd1", "loha")]), "-o", str(out)])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    assert "example:" in capsys.readouterr().out

"""lyco convert: diffusers files load in diffusers and compute what lyco's attach computes; exact
conversions are exact, SVD ones report the optimum's error; naming styles, dtypes, metadata."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import lyco
from lyco.algorithms.base import LayerSpec
from lyco.cli import main
from lyco.errors import ConfigError
from lyco.models import tiny
from lyco.tools import convert
from lyco.tools._common import weight_shape

from _tools_common import forwards


def dense(ma, shape):
    spec = LayerSpec("conv2d" if len(shape) == 4 else "linear", tuple(shape))
    t = {k: (v.double() if v.is_floating_point() else v) for k, v in ma.tensors.items()}
    return ma.algorithm.delta_weight(t, spec).reshape(shape[0], -1)


def rel(a, b):
    return float((a - b).norm() / a.norm())


def test_lora_to_diffusers_loads_with_load_lora_weights(algo_files, tmp_path):
    src = algo_files[("sd1", "lora")]  # LoCon on every layer incl. k×k convs and the text encoder
    out = tmp_path / "diffusers_lora.safetensors"
    res = convert(src, out, to="diffusers", verbose=False)
    assert res.errors == {}  # LoRA → diffusers is exact
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.r"] in (2, 4)
    ours = tiny.tiny_pipeline("sd1", seed=0, dtype=torch.float64)
    theirs = tiny.tiny_pipeline("sd1", seed=0, dtype=torch.float64)
    base = forwards(ours, "sd1")
    h = lyco.load(src).attach(ours)
    want = forwards(ours, "sd1")
    h.detach()
    theirs.load_lora_weights(str(tmp_path), weight_name=out.name)
    got = forwards(theirs, "sd1")
    for k in want:
        scale = float(want[k].abs().max())
        assert float((want[k] - base[k]).abs().max()) > 1e-3 * scale, k  # the adapter does something
        assert float((want[k] - got[k]).abs().max()) <= 1e-9 * max(1.0, scale), k


def test_exact_conversions_to_lora(algo_files, tmp_path):
    for key in ("loha", "lokr-full", "locon-tucker", "loha-conv"):  # (LoKr low-rank: see test_resize)
        src = algo_files[("sd1", key)]
        a = lyco.load(src)
        res = convert(src, tmp_path / f"{key}.safetensors", to="lora", dtype="fp32", verbose=False)
        b = lyco.load(tmp_path / f"{key}.safetensors")
        assert set(b.algos()) == {"lora"} and set(b.modules) == set(a.modules)
        assert all(e == 0.0 for e in res.errors.values())
        for n, ma in list(a.modules.items())[::3]:
            shape = weight_shape(n, b.modules[n], "sd1")
            assert "lora_mid.weight" not in b.modules[n].tensors
            assert rel(dense(ma, shape), dense(b.modules[n], shape)) < 1e-6, (key, n)
    # LoHa + DoRA: the inner LoHa becomes LoRA, dora_scale is kept
    a = lyco.load(algo_files[("sd1", "loha-dora")])
    res = convert(a, tmp_path / "ld.safetensors", to="diffusers", verbose=False)
    with safe_open(str(tmp_path / "ld.safetensors"), "pt") as f:
        assert sum(k.endswith("lora_magnitude_vector") for k in f.keys()) == len(a.modules)


def test_svd_conversion_reports_the_optimal_error(algo_files, tmp_path, capsys):
    a = lyco.load(algo_files[("sd1", "loha")])  # rank 2 → an exact LoRA of rank 4
    out = tmp_path / "r2.safetensors"
    assert main(["convert", str(algo_files[("sd1", "loha")]), "-o", str(out), "--to", "diffusers",
                 "--rank", "2", "--dtype", "fp32"]) == 0
    assert "rel.err" in capsys.readouterr().err
    b = lyco.load(out)
    errs = json.loads(b.metadata["lyco.errors"])
    for n, ma in list(a.modules.items())[::5]:
        shape = weight_shape(n, ma, "sd1")
        dw = dense(ma, shape)
        s = torch.linalg.svdvals(dw)
        opt = float(torch.sqrt((s[2:] ** 2).sum() / (s ** 2).sum()))
        assert errs[n] == pytest.approx(opt, abs=1e-6)
        assert rel(dw, dense(b.modules[n], shape)) == pytest.approx(opt, abs=1e-5)


def test_diffusers_back_to_kohya_and_sdxl_naming(algo_files, tmp_path):
    src = algo_files[("sdxl", "lora")]
    a = lyco.load(src)
    convert(src, tmp_path / "d.safetensors", to="peft", verbose=False)
    convert(tmp_path / "d.safetensors", tmp_path / "k.safetensors", to="kohya", verbose=False)
    back = lyco.load(tmp_path / "k.safetensors")
    assert set(back.modules) == set(a.modules) and back.family == "sdxl"
    for n, ma in list(a.modules.items())[::7]:
        shape = tuple(ma.algorithm.infer_weight_shape(ma.tensors))
        assert rel(dense(ma, shape), dense(back.modules[n], shape)) < 1e-6
    # SDXL kohya files use LDM names; --naming diffusers rewrites them, and both read back alike
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())
    convert(tmp_path / "k.safetensors", tmp_path / "kd.safetensors", naming="diffusers", verbose=False)
    with safe_open(str(tmp_path / "kd.safetensors"), "pt") as f:
        unet_keys = [k for k in f.keys() if k.startswith("lora_unet_")]
        assert unet_keys and all(k.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_",
                                               "lora_unet_mid_block_", "lora_unet_conv_", "lora_unet_time_",
                                               "lora_unet_add_")) for k in unet_keys)
    kd = lyco.load(tmp_path / "kd.safetensors")
    for n, ma in back.modules.items():
        for k, v in ma.tensors.items():
            assert torch.equal(kd.modules[n].tensors[k], v), (n, k)


def test_dtype_and_metadata_editing(algo_files, tmp_path):
    src = algo_files[("sd1", "loha")]
    out = tmp_path / "m.safetensors"
    assert main(["convert", str(src), "-o", str(out), "--dtype", "bf16", "--set-meta", "ss_output_name=mine",
                 "--set-meta", "my_key=a=b", "--quiet"]) == 0
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith("alpha")} == {torch.bfloat16}
    assert md["ss_output_name"] == "mine" and md["my_key"] == "a=b"
    assert md["ss_network_module"] == "lycoris.kohya" and md["lyco_family"] == "sd1"
    src_md = lyco.load(src).metadata
    assert "ss_network_args" in src_md and "sshs_model_hash" in md  # hashes recomputed
    # --strip-meta: only the minimum keys remain
    out2 = tmp_path / "s.safetensors"
    convert(src, out2, set_meta=["modelspec.title=t"], strip_meta=True, verbose=False)
    with safe_open(str(out2), "pt") as f:
        md2 = f.metadata()
    assert md2["modelspec.title"] == "t"
    assert not any(k.startswith(("lyco_train", "ss_training", "ss_tag", "ss_dataset")) for k in md2)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        convert(src, tmp_path / "x.safetensors", set_meta=["novalue"], verbose=False)


def test_refusals_and_weight_dependent_modules(algo_files, ckpts, tmp_path):
    with pytest.raises(ConfigError, match="Norm"):
        convert(algo_files[("sd1", "norm")], tmp_path / "n.safetensors", to="lora", verbose=False)
    with pytest.raises(ConfigError, match="diff_b"):
        convert(algo_files[("sd1", "full")], tmp_path / "f.safetensors", to="lora", verbose=False)
    with pytest.raises(ConfigError, match="--base"):
        convert(algo_files[("sd1", "ia3")], tmp_path / "i.safetensors", to="diffusers", verbose=False)
    with pytest.raises(ConfigError, match="resize"):
        convert(algo_files[("sd1", "loha")], tmp_path / "i.safetensors", to="kohya", rank=2, verbose=False)
    # IA3 with the base model: ΔW = W ⊙ w, as a LoRA of its numerical rank (exact)
    a = lyco.load(algo_files[("sd1", "ia3")])
    res = convert(a, tmp_path / "i.safetensors", to="lora", base=ckpts["sd1"]["single"], dtype="fp32", verbose=False)
    from lyco.formats.checkpoint import open_checkpoint
    with open_checkpoint(ckpts["sd1"]["single"]) as ck:
        for n, ma in list(a.modules.items())[::6]:
            w = ck.get_canonical(n + ".weight").double()
            spec = LayerSpec("conv2d" if w.dim() == 4 else "linear", tuple(w.shape))
            dw = ma.algorithm.delta_weight({k: v.double() if v.is_floating_point() else v
                                            for k, v in ma.tensors.items()}, spec, w).reshape(w.shape[0], -1)
            assert rel(dw, dense(res.adapter.modules[n], tuple(w.shape))) < 1e-6 and res.errors[n] < 1e-6

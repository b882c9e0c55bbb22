"""Metadata: kohya sshs_* hashes computed by hand from raw file bytes, ss_*/modelspec builders,
base-model hashes, safe display and lyco_* keys."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from lyco.adapter import Adapter, ModuleAdapter
from lyco.errors import ConfigError
from lyco.formats import metadata as md


def _hand_hashes(path) -> tuple[str, str]:
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    model = hashlib.sha256(raw[8 + n:]).hexdigest()
    legacy = hashlib.sha256(raw[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model, legacy


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(3)
    # > 1 MiB in total so the legacy hash window covers real tensor bytes
    return {
        "lora_unet_a.lora_down.weight": torch.randn(4, 320, generator=g),
        "lora_unet_a.lora_up.weight": torch.randn(640, 4, generator=g).half(),
        "lora_unet_a.alpha": torch.tensor(2.0),
        "lora_unet_big.diff": torch.randn(600, 500, generator=g),
    }


def test_precalculate_hashes_match_raw_file_bytes(tmp_path, tensors):
    meta = {"ss_network_dim": "4", "ss_output_name": "thing", "modelspec.title": "x", "user_note": "y"}
    p = tmp_path / "f.safetensors"
    save_file(tensors, str(p), metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    model, legacy = md.precalculate_hashes(tensors, meta)
    hand_model, hand_legacy = _hand_hashes(p)
    assert model == hand_model and len(model) == 64
    assert legacy == hand_legacy and len(legacy) == 8
    assert md.addnet_hash_of_file(p) == hand_model
    out = md.add_hashes(tensors, meta)
    assert out["sshs_model_hash"] == model and out["sshs_legacy_hash"] == legacy


def test_only_ss_keys_influence_the_hashes(tensors):
    base = {"ss_network_dim": "4"}
    h0 = md.precalculate_hashes(tensors, base)
    # non-ss keys (user-editable, modelspec, lyco) change nothing
    assert md.precalculate_hashes(tensors, {**base, "modelspec.title": "other", "lyco_version": "9",
                                            "note": "z" * 1000}) == h0
    # an ss_ key changes the header, hence the legacy hash, but not the header-free model hash
    h1 = md.precalculate_hashes(tensors, {**base, "ss_output_name": "a-much-longer-name"})
    assert h1[0] == h0[0] and h1[1] != h0[1]
    # a tensor change changes the model hash
    t2 = dict(tensors)
    t2["lora_unet_a.alpha"] = torch.tensor(3.0)
    assert md.precalculate_hashes(t2, base)[0] != h0[0]


def test_legacy_hash_of_small_file_is_hash_of_nothing():
    model, legacy = md.precalculate_hashes({"a": torch.ones(3)}, {})
    assert legacy == hashlib.sha256(b"").hexdigest()[:8]
    assert model == hashlib.sha256(torch.ones(3).numpy().tobytes()).hexdigest()


def test_sd_model_hashes(tmp_path):
    data = bytes((i * 7 + 3) % 251 for i in range(2 * 1024 * 1024 + 17))
    p = tmp_path / "model.ckpt"
    p.write_bytes(data)
    old, full = md.sd_model_hashes(p)
    assert old == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert full == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("family,v,bmv,v2,arch,impl,res", [
    ("sd1", False, "sd_v1", "False", "stable-diffusion-v1/lora", "diffusers", "512x512"),
    ("sd2", False, "sd_v2", "True", "stable-diffusion-v2-512/lora", "diffusers", "512x512"),
    ("sd2", True, "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "diffusers", "768x768"),
    ("sdxl", False, "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora",
     "https://github.com/Stability-AI/generative-models", "1024x1024"),
])
def test_build_minimum_metadata(family, v, bmv, v2, arch, impl, res):
    out = md.build_minimum_metadata(family=family, v_pred=v, dim=8, alpha=4.0, network_module="lycoris.kohya",
                                    network_args={"algo": "lokr", "conv_dim": 4, "dora_wd": True},
                                    output_name="my_lora", timestamp=1_700_000_000)
    assert all(isinstance(k, str) and isinstance(x, str) for k, x in out.items())
    assert set(md.SS_MINIMUM_KEYS) <= set(out)
    assert out["ss_base_model_version"] == bmv
    assert out["ss_v2"] == v2
    assert out["ss_network_dim"] == "8" and out["ss_network_alpha"] == "4.0"
    assert json.loads(out["ss_network_args"]) == {"algo": "lokr", "conv_dim": "4", "dora_wd": "True"}
    assert out["ss_output_name"] == "my_lora"
    assert out["modelspec.sai_model_spec"] == "1.0.1"
    assert out["modelspec.architecture"] == arch
    assert out["modelspec.implementation"] == impl
    assert out["modelspec.resolution"] == res
    assert out["modelspec.title"] == "my_lora"
    assert out["modelspec.prediction_type"] == ("v" if v else "epsilon")
    assert out["modelspec.date"].startswith("2023-11-1")
    assert md.family_from_metadata(out) == family


def test_build_minimum_metadata_rejects_unknown_family():
    with pytest.raises(ConfigError):
        md.build_minimum_metadata(family="sd3", dim=4, alpha=4)


def test_network_info():
    g = torch.Generator().manual_seed(0)

    def lora(out, inp, r, alpha, k=None):
        ks = (k, k) if k else ()
        return ModuleAdapter("lora", {"lora_down.weight": torch.randn((r, inp) + ks, generator=g),
                                      "lora_up.weight": torch.randn((out, r) + ((1, 1) if k else ()), generator=g),
                                      "alpha": torch.tensor(float(alpha))})
    a = Adapter({"unet.a": lora(8, 8, 4, 2), "unet.b": lora(8, 8, 4, 2), "unet.c": lora(8, 8, 2, 1),
                 "unet.conv": lora(8, 4, 3, 1.5, k=3)})
    info = md.network_info(a)
    assert info["dim"] == 4 and info["alpha"] == 2.0
    assert info["network_module"] == "networks.lora"
    assert info["network_args"] == {"conv_dim": 3, "conv_alpha": 1.5}
    out = md.build_minimum_metadata(family="sd1", **info)
    assert out["ss_network_module"] == "networks.lora"


def test_safe_display_escapes_terminal_controls():
    evil = "ok\x1b[2J\x1b]0;title\x07\r\nnext\u202eevil\u200b\x00\x9b\\"
    s = md.safe_display(evil, 500)
    for bad in ("\x1b", "\x07", "\r", "\n", "\u202e", "\u200b", "\x00", "\x9b"):
        assert bad not in s
    assert s.startswith("ok\\x1b[2J\\x1b]0;title\\x07\\r\\nnext\\u202eevil\\u200b\\x00\\x9b\\\\")
    assert s.isprintable()
    assert md.safe_display("héllo wörld ✓") == "héllo wörld ✓"


def test_safe_display_limits_length():
    s = md.safe_display("x" * 10_000, 50)
    assert len(s) < 80 and s.startswith("x" * 50) and "+9950" in s
    s2 = md.safe_display("\x1b" * 100, 20)  # escapes count toward the limit
    assert len(s2) < 45 and "\x1b" not in s2
    assert md.safe_display(12345) == "12345"


def test_lyco_keys():
    m: dict[str, str] = {}
    md.set_lyco(m, "dora_axis", "input")
    md.set_lyco(m, md.LYCO_OFT_CONSTRAINT, "lycoris")
    md.stamp_version(m)
    assert m["lyco_dora_axis"] == "input" and m["lyco_oft_constraint"] == "lycoris"
    assert md.get_lyco(m, "lyco_dora_axis") == "input"
    assert md.get_lyco(m, "lokr_full_scale", "one") == "one"
    assert md.get_lyco({"lyco_dora_axis": "sideways"}, "dora_axis") is None
    assert set(md.lyco_metadata({**m, "ss_x": "1"})) == {"lyco_dora_axis", "lyco_oft_constraint", "lyco_version"}
    with pytest.raises(ConfigError):
        md.set_lyco(m, "dora_axis", "diagonal")
    with pytest.raises(ConfigError):
        md.set_lyco(m, "no_such_key", "x")
    # lyco keys never change the kohya hashes
    t = {"a": torch.ones(2)}
    assert md.precalculate_hashes(t, {"ss_a": "1", **m}) == md.precalculate_hashes(t, {"ss_a": "1"})


def _lora_mod(out, inp, r, alpha, g, dora=None):
    t = {"lora_down.weight": torch.randn(r, inp, generator=g), "lora_up.weight": torch.randn(out, r, generator=g),
         "alpha": torch.tensor(float(alpha))}
    if dora == "output":
        t["dora_scale"] = torch.rand(out, 1, generator=g)
    elif dora == "input":
        t["dora_scale"] = torch.rand(1, inp, generator=g)
    return ModuleAdapter("lora", t)


def test_adapter_metadata_from_create_args():
    g = torch.Generator().manual_seed(1)
    a = Adapter({"unet.a": _lora_mod(8, 6, 4, 2, g, "output"), "unet.b": _lora_mod(8, 8, 4, 2, g, "output")},
                {"ss_output_name": "mine", "sshs_model_hash": "stale", "format": "pt"}, "sdxl", None,
                {"algo": "lora", "rank": 4, "alpha": 2.0, "preset": "attn-mlp", "conv_rank": None,
                 "conv_alpha": None, "dora": True, "dora_axis": "out"})
    out = md.adapter_metadata(a, timestamp=0)
    assert all(isinstance(v, str) for v in out.values())
    assert "sshs_model_hash" not in out and "format" not in out
    assert set(md.SS_MINIMUM_KEYS) <= set(out)
    assert out["ss_network_dim"] == "4" and out["ss_network_alpha"] == "2.0"
    assert out["ss_network_module"] == "lycoris.kohya"  # DoRA: kohya's networks.lora cannot load it
    assert json.loads(out["ss_network_args"]) == {"algo": "lora", "preset": "attn-mlp", "dora": "True",
                                                  "dora_axis": "out"}
    assert out["ss_base_model_version"] == "sdxl_base_v1-0" and out["ss_v2"] == "False"
    assert out["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert out["modelspec.title"] == "mine"
    assert out["lyco_family"] == "sdxl" and out["lyco_dora_axis"] == "output" and "lyco_version" in out


def test_adapter_metadata_keeps_provenance_and_reads_content():
    g = torch.Generator().manual_seed(2)
    lokr = ModuleAdapter("lokr", {"lokr_w1": torch.randn(2, 2, generator=g), "lokr_w2": torch.randn(4, 3, generator=g),
                                  "alpha": torch.tensor(1.0)})
    a = Adapter({"unet.a": _lora_mod(8, 6, 2, 1, g, "input"), "unet.b": _lora_mod(6, 6, 2, 1, g, "input"),
                 "unet.c": lokr},
                {"ss_network_dim": "32", "ss_network_module": "networks.lora", "ss_training_comment": "kept"})
    out = md.adapter_metadata(a)
    assert out["ss_network_dim"] == "32" and out["ss_training_comment"] == "kept"
    assert out["ss_network_module"] == "lycoris.kohya"  # corrected: the content is not plain LoRA
    assert out["ss_network_alpha"] == "1.0"
    assert "ss_base_model_version" not in out and "modelspec.architecture" not in out  # unknown family
    assert out["lyco_dora_axis"] == "input" and out["lyco_lokr_full_scale"] == "one"
    # the tensors as written decide the recorded DoRA axis
    written = {"x.dora_scale": torch.ones(5, 1), "y.dora_scale": torch.ones(7, 1, 1, 1)}
    assert md.adapter_metadata(a, written)["lyco_dora_axis"] == "output"
    assert md.dora_axis_of({"x.dora_scale": torch.ones(1, 1)}) is None

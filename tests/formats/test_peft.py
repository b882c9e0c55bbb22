"""diffusers/PEFT files ↔ Adapter, checked against real PEFT layers and a real diffusers pipeline.

Every ΔW here is computed densely in float64 from the Adapter's tensors with the house convention
(γ = alpha/rank, written out in this file, independent of lyco.algorithms) and compared with what
PEFT (``get_delta_weight``) or diffusers (``load_lora_weights`` + ``fuse_lora``) produce.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from lyco.adapter import Adapter, ModuleAdapter
from lyco.errors import FormatError, UnknownKeys
from lyco.formats.peft import from_peft, is_peft_state_dict, to_peft
from lyco.formats.safetensors_io import load_tensors, save_tensors

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model, inject_adapter_in_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

# --------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------


def tiny_unet():
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=16, norm_num_groups=4,
        sample_size=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _clip_config(**kw):
    return CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **kw)


def tiny_text_encoder():
    return CLIPTextModel(_clip_config())


def tiny_pipe():
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    return StableDiffusionPipeline(vae=vae, text_encoder=tiny_text_encoder(), tokenizer=None, unet=tiny_unet(),
                                   scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def te_canonical(name: str) -> str:
    return name if name.startswith("text_model.") else "text_model." + name


# --------------------------------------------------------------------------------------
# dense references (house convention, float64)
# --------------------------------------------------------------------------------------


def _f64(t):
    return t.detach().to(torch.float64)


def dense_lora(t, shape):
    down, up = _f64(t["lora_down.weight"]), _f64(t["lora_up.weight"])
    r = down.shape[0]
    a = t.get("alpha")
    gamma = 1.0 if a is None else float(a) / r
    if "scalar" in t:
        gamma *= float(t["scalar"])
    return (up.reshape(up.shape[0], -1) @ down.reshape(r, -1)).reshape(shape) * gamma


def _cp(core, a, b):
    # W[p, q, …] = Σ_ij core[i, j, …]·a[i, p]·b[j, q]
    return torch.einsum("ij...,ip,jq->pq...", core, a, b)


def dense_loha(t, shape):
    t = {k: _f64(v) for k, v in t.items()}
    r = t["hada_w1_b"].shape[0]
    if "hada_t1" in t:
        w1 = _cp(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        w2 = _cp(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    else:
        w1 = t["hada_w1_a"] @ t["hada_w1_b"]
        w2 = t["hada_w2_a"] @ t["hada_w2_b"]
    return (w1 * w2).reshape(shape) * (float(t["alpha"]) / r)


def dense_lokr(t, shape):
    t = {k: _f64(v) for k, v in t.items()}
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if len(shape) > 2 and w2.dim() == 2:
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    w1 = w1.reshape(w1.shape + (1,) * (w2.dim() - 2))
    if "lokr_w1" in t and "lokr_w2" in t:
        gamma = 1.0  # LyCORIS/A1111/ComfyUI: two full factors ignore alpha
    else:
        r = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0]
        gamma = float(t["alpha"]) / r
    return torch.kron(w1, w2).reshape(shape) * gamma


def dora_merged(w, dw, m):
    v = _f64(w) + dw
    n = v.reshape(v.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (v.dim() - 1))
    return _f64(m) * v / n


def tuner_layers(model):
    return {n: mod for n, mod in model.named_modules() if isinstance(mod, BaseTunerLayer)}


def randomize_adapter_params(model, gen):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in ("lora_", "hada_", "lokr_")):
                if "magnitude" in n:
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def assert_close64(a, b, what="", tol=1e-6):
    a, b = _f64(a), _f64(b)
    assert a.shape == b.shape, f"{what}: {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.abs().max().item() if b.numel() else 1.0)
    # tensors are stored in float32 (alpha as a float32 0-d tensor, PEFT scales LoHa by a float32
    # tensor): rounding at ~1e-8 is expected; a wrong scale or layout gives errors of order 1
    assert err <= tol * scale, f"{what}: max error {err}"


# --------------------------------------------------------------------------------------
# PEFT/diffusers → Adapter
# --------------------------------------------------------------------------------------

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj",
                "conv_shortcut", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def test_diffusers_lora_file_gives_peft_delta_weights(tmp_path):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    unet, te = tiny_unet(), tiny_text_encoder()
    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS,
                      rank_pattern={"^down_blocks.0.resnets.0.conv1": 2, "proj_in": 3},
                      alpha_pattern={"^up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 5, "conv2": 1.5})
    tcfg = LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=TE_TARGETS,
                      rank_pattern={"fc1": 4}, alpha_pattern={"layers.1.self_attn.v_proj": 7})
    inject_adapter_in_model(ucfg, unet)
    inject_adapter_in_model(tcfg, te)
    randomize_adapter_params(unet, gen)
    randomize_adapter_params(te, gen)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    tensors, meta = load_tensors(path)
    assert meta["format"] == "pt" and "lora_adapter_metadata" in meta
    assert is_peft_state_dict(tensors)
    adapter = from_peft(tensors, meta, source=str(path))

    unet.double()
    te.double()
    expected = {f"unet.{n}": m for n, m in tuner_layers(unet).items()}
    expected.update({f"text_encoder.{te_canonical(n)}": m for n, m in tuner_layers(te).items()})
    assert set(adapter.modules) == set(expected)
    assert len(expected) > 40
    gammas = set()
    for name, layer in expected.items():
        m = adapter.modules[name]
        assert m.algo == "lora" and not m.is_dora
        shape = tuple(layer.get_base_layer().weight.shape)
        ours = dense_lora(m.tensors, shape)
        assert_close64(ours, layer.get_delta_weight("default"), name)
        gammas.add(round(float(m.tensors["alpha"]) / m.tensors["lora_down.weight"].shape[0], 9))
    assert len(gammas) >= 5  # patterns and rs-LoRA really gave different scales
    assert adapter.metadata.get("lyco_source_format") == "peft"
    assert "lora_adapter_metadata" not in adapter.metadata


def test_peft_dora_magnitude_becomes_output_axis_dora_scale(tmp_path):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    unet = tiny_unet()
    cfg = LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=["to_q", "proj_in", "conv1"])
    inject_adapter_in_model(cfg, unet)
    randomize_adapter_params(unet, gen)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=cfg.to_dict())
    tensors, meta = load_tensors(tmp_path / "pytorch_lora_weights.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
    adapter = from_peft(tensors, meta)
    assert adapter.metadata["lyco_dora_axis"] == "output"
    unet.double()
    layers = tuner_layers(unet)
    assert set(adapter.modules) == {f"unet.{n}" for n in layers}
    for n, layer in layers.items():
        m = adapter.modules[f"unet.{n}"]
        w = layer.get_base_layer().weight.detach().clone()
        ds = m.tensors["dora_scale"]
        assert ds.shape == (w.shape[0],) + (1,) * (w.dim() - 1)
        ours = dora_merged(w, dense_lora(m.tensors, tuple(w.shape)), ds)
        layer.merge(adapter_names=["default"])
        assert_close64(ours, layer.get_base_layer().weight, n)


def test_peft_model_prefix_and_adapter_names():
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    cfg = LoraConfig(r=3, lora_alpha=2, target_modules=["q_proj", "fc2"], rank_pattern={"fc2": 2})
    model = get_peft_model(tiny_text_encoder(), cfg)
    randomize_adapter_params(model, gen)
    full = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert any(".lora_A.default.weight" in k and k.startswith("base_model.model.") for k in full)
    saved = get_peft_model_state_dict(model)
    model.double()
    layers = tuner_layers(model.base_model.model)
    for sd in (full, saved):
        adapter = from_peft(sd, config=cfg.to_dict())
        assert set(adapter.modules) == {f"text_encoder.{te_canonical(n)}" for n in layers}
        for n, layer in layers.items():
            m = adapter.modules[f"text_encoder.{te_canonical(n)}"]
            ours = dense_lora(m.tensors, tuple(layer.get_base_layer().weight.shape))
            assert_close64(ours, layer.get_delta_weight("default"), n)
    # without a config PEFT LoRA has no alpha information: scale 1 (alpha = rank)
    bare = from_peft(saved)
    for m in bare.modules.values():
        assert float(m.tensors["alpha"]) == m.tensors["lora_down.weight"].shape[0]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 20)
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.pw = nn.Conv2d(8, 12, 1)


@pytest.mark.parametrize("kind,cfg", [
    ("loha", LoHaConfig(r=3, alpha=5, target_modules=["lin", "conv", "pw"], rank_pattern={"lin": 2},
                        alpha_pattern={"conv": 7})),
    ("loha", LoHaConfig(r=2, alpha=3, target_modules=["lin", "conv"], use_effective_conv2d=True)),
    ("lokr", LoKrConfig(r=2, alpha=3, target_modules=["lin", "conv", "pw"], decompose_both=True,
                        use_effective_conv2d=True, decompose_factor=4)),
    ("lokr", LoKrConfig(r=2, alpha=5, target_modules=["lin", "conv"], rank_pattern={"conv": 1})),
    ("lokr", LoKrConfig(r=16, alpha=6, target_modules=["lin", "conv", "pw"])),  # both factors full
])
def test_peft_loha_lokr_give_peft_delta_weights(kind, cfg):
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = get_peft_model(_Net(), cfg)
    randomize_adapter_params(model, gen)
    sd = get_peft_model_state_dict(model)
    assert all(k.startswith("base_model.model.") for k in sd)
    assert is_peft_state_dict(sd)
    adapter = from_peft(sd, config=cfg.to_dict())
    model.double()
    layers = tuner_layers(model.base_model.model)
    assert set(adapter.modules) == {f"model.{n}" for n in layers}
    full_full = 0
    for n, layer in layers.items():
        m = adapter.modules[f"model.{n}"]
        assert m.algo == kind
        shape = tuple(layer.get_base_layer().weight.shape)
        ours = (dense_loha if kind == "loha" else dense_lokr)(m.tensors, shape)
        assert_close64(ours, layer.get_delta_weight("default"), n)
        full_full += "lokr_w1" in m.tensors and "lokr_w2" in m.tensors
    if cfg.r == 16:
        assert full_full == 3  # the case where PEFT's alpha/r had to be folded into lokr_w1


def test_older_diffusers_key_layouts():
    g = torch.Generator().manual_seed(7)

    def pair(out, inp, r):
        return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)

    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    d1, u1 = pair(8, 8, 2)
    d2, u2 = pair(8, 8, 3)
    d3, u3 = pair(8, 8, 2)
    d4, u4 = pair(16, 16, 4)
    d5, u5 = pair(32, 16, 2)
    d6, u6 = pair(16, 16, 1)
    d7, u7 = pair(16, 16, 2)
    sd = {
        f"{attn}.processor.to_q_lora.down.weight": d1, f"{attn}.processor.to_q_lora.up.weight": u1,
        f"{attn}.processor.to_out_lora.down.weight": d2, f"{attn}.processor.to_out_lora.up.weight": u2,
        f"{attn}.to_k_lora.down.weight": d3, f"{attn}.to_k_lora.up.weight": u3,
        f"{attn}.to_k_lora.down.weight.alpha": torch.tensor(1.0),
        "unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": d4.reshape(4, 16, 1, 1),
        "unet.down_blocks.0.attentions.0.proj_in.lora.up.weight": u4.reshape(16, 4, 1, 1),
        "unet.down_blocks.0.attentions.0.proj_in.alpha": torch.tensor(2.0),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight": d6,
        "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.up.weight": u6,
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": d5,
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": u5,
        "text_encoder_2.encoder.layers.1.self_attn.q_proj.lora_A.default.weight": d7,
        "text_encoder_2.encoder.layers.1.self_attn.q_proj.lora_B.default.weight": u7,
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_A.weight": d4,
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight": u4,
    }
    assert is_peft_state_dict(sd)
    a = from_peft(sd)
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    expect = {
        f"{base}.to_q": (d1, u1, 2.0), f"{base}.to_out.0": (d2, u2, 3.0), f"{base}.to_k": (d3, u3, 1.0),
        "unet.down_blocks.0.attentions.0.proj_in": (d4.reshape(4, 16, 1, 1), u4.reshape(16, 4, 1, 1), 2.0),
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj": (d6, u6, 1.0),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1": (d5, u5, 2.0),
        "text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj": (d7, u7, 2.0),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0": (d4, u4, 4.0),
    }
    assert set(a.modules) == set(expect)
    for n, (d, u, alpha) in expect.items():
        t = a.modules[n].tensors
        assert torch.equal(t["lora_down.weight"], d) and torch.equal(t["lora_up.weight"], u)
        assert float(t["alpha"]) == alpha, n
    assert a.family == "sdxl"


def test_is_peft_state_dict_rejects_kohya_keys():
    assert not is_peft_state_dict([])
    assert not is_peft_state_dict(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                                   "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"])
    assert not is_peft_state_dict(["lycoris_lin.hada_w1_a", "lycoris_lin.hada_w1_b"])
    assert not is_peft_state_dict(["lin.hada_w1_a"])  # flat name: not a dotted module path
    assert is_peft_state_dict(["unet.conv_in.lora_A.weight", "unet.conv_in.lora_B.weight"])


def test_from_peft_errors():
    d, u = torch.randn(2, 8), torch.randn(8, 2)
    with pytest.raises(UnknownKeys, match="unet.conv_in.weight"):
        from_peft({"unet.conv_in.lora_A.weight": d, "unet.conv_in.lora_B.weight": u, "unet.conv_in.weight": u})
    with pytest.raises(FormatError, match="no lora_B"):
        from_peft({"unet.conv_in.lora_A.weight": d})
    with pytest.raises(FormatError, match="bias"):
        from_peft({"unet.x.lora_A.weight": d, "unet.x.lora_B.weight": u, "unet.x.lora_B.bias": torch.zeros(8)})
    with pytest.raises(FormatError, match="do not chain"):
        from_peft({"unet.x.lora_A.weight": d, "unet.x.lora_B.weight": torch.randn(8, 3)})
    with pytest.raises(FormatError, match="exactly one adapter type"):
        from_peft({"unet.x.lora_A.weight": d, "unet.x.lora_B.weight": u, "unet.x.hada_w1_a": u})
    with pytest.raises(FormatError, match="rank"):
        from_peft({"unet.x.lora_A.weight": d, "unet.x.lora_B.weight": u},
                  {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4})})
    with pytest.raises(FormatError, match="lora_adapter_metadata"):
        from_peft({"unet.x.lora_A.weight": d, "unet.x.lora_B.weight": u}, {"lora_adapter_metadata": "{oops"})
    with pytest.raises(FormatError, match="two keys"):
        from_peft({"unet.x.lora_A.weight": d, "unet.x.lora_A.default.weight": d, "unet.x.lora_B.weight": u})


# --------------------------------------------------------------------------------------
# Adapter → diffusers (loaded by the real pipeline)
# --------------------------------------------------------------------------------------


def random_adapter(pipe, gen, *, dora: bool = False, unet_only: bool = False) -> tuple[Adapter, dict]:
    """LoRA/LoCon modules with random ranks/alphas on many layers; returns (adapter, weight shapes)."""
    modules, shapes = {}, {}
    ranks = [1, 2, 3, 4]
    alphas = [None, 1.0, 2.5, 4.0, 0.75]
    i = 0
    comps = [("unet", pipe.unet)] + ([] if unet_only else [("text_encoder", pipe.text_encoder)])
    for comp, model in comps:
        for n, mod in model.named_modules():
            if not isinstance(mod, (nn.Linear, nn.Conv2d)):
                continue
            if comp == "unet" and not n.endswith(tuple(UNET_TARGETS)):
                continue
            if dora and not n.endswith(("to_q", "to_v", "proj_in", "conv1", "ff.net.2")):
                continue
            path = te_canonical(n) if comp == "text_encoder" else n
            w = mod.weight
            r = ranks[i % len(ranks)]
            alpha = alphas[(i // 2) % len(alphas)]
            i += 1
            if w.dim() == 4:
                down = torch.randn((r, w.shape[1]) + tuple(w.shape[2:]), generator=gen)
                up = torch.randn((w.shape[0], r, 1, 1), generator=gen)
            else:
                down = torch.randn((r, w.shape[1]), generator=gen)
                up = torch.randn((w.shape[0], r), generator=gen)
            t = {"lora_down.weight": down * 0.3, "lora_up.weight": up * 0.3}
            if alpha is not None:
                t["alpha"] = torch.tensor(alpha)
            if i == 5:
                t["scalar"] = torch.tensor(0.7)
            if dora:
                t["dora_scale"] = torch.rand((w.shape[0],) + (1,) * (w.dim() - 1), generator=gen) + 0.5
            modules[f"{comp}.{path}"] = ModuleAdapter("lora", t)
            shapes[f"{comp}.{path}"] = tuple(w.shape)
    return Adapter(modules, {"ss_network_dim": "4", "sshs_model_hash": "stale"}, "sd1"), shapes


def _base_weights(pipe, adapter):
    out = {}
    for name in adapter.modules:
        comp, path = name.split(".", 1)
        model = getattr(pipe, comp)
        if not hasattr(model, "text_model"):
            path = path.removeprefix("text_model.")
        out[name] = (model, path, model.get_submodule(path).weight.detach().clone())
    return out


def _check_fused(pipe, adapter, shapes, base, *, dora=False):
    for comp in adapter.components():
        model = getattr(pipe, comp)
        wrapped = {n for n, _ in tuner_layers(model).items()}
        mine = {(n.split(".", 1)[1] if hasattr(model, "text_model") else
                 n.split(".", 1)[1].removeprefix("text_model.")) for n in adapter.modules if n.startswith(comp + ".")}
        assert wrapped == mine, f"{comp}: PEFT wrapped a different set of layers"
    for name, m in adapter.modules.items():
        model, path, w0 = base[name]
        layer = model.get_submodule(path)
        assert isinstance(layer, BaseTunerLayer), name
        w1 = layer.get_base_layer().weight
        dw = dense_lora(m.tensors, shapes[name])
        if dora:
            assert_close64(w1, dora_merged(w0, dw, m.tensors["dora_scale"]), name)
        else:
            assert_close64(_f64(w1) - _f64(w0), dw, name)


def test_to_peft_file_loads_in_diffusers_with_per_module_alphas(tmp_path):
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    pipe = tiny_pipe()
    pipe.unet.double()
    pipe.text_encoder.double()
    adapter, shapes = random_adapter(pipe, gen)
    tensors, meta = to_peft(adapter)
    assert all("lora" in k for k in tensors)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.") for k in tensors)
    assert meta["format"] == "pt" and "sshs_model_hash" not in meta and meta["ss_network_dim"] == "4"
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["unet.alpha_pattern"] and cfg["unet.rank_pattern"] and cfg["unet.use_rslora"] is False
    save_tensors(tensors, tmp_path / "lora.safetensors", meta)
    base = _base_weights(pipe, adapter)
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    pipe.fuse_lora()
    _check_fused(pipe, adapter, shapes, base)

    # and back: the file decodes to the same ΔW per module
    t2, m2 = load_tensors(tmp_path / "lora.safetensors")
    back = from_peft(t2, m2)
    assert back.family == "sd1" and back.metadata["ss_network_dim"] == "4"
    assert set(back.modules) == set(adapter.modules)
    for n, m in adapter.modules.items():
        assert_close64(dense_lora(back.modules[n].tensors, shapes[n]), dense_lora(m.tensors, shapes[n]), n)


def test_to_peft_baked_dict_loads_without_metadata():
    gen = torch.Generator().manual_seed(12)
    torch.manual_seed(12)
    pipe = tiny_pipe()
    pipe.unet.double()
    pipe.text_encoder.double()
    adapter, shapes = random_adapter(pipe, gen)
    tensors, meta = to_peft(adapter, bake_scale=True)
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["unet.alpha_pattern"] == cfg["unet.rank_pattern"] and cfg["unet.lora_alpha"] == cfg["unet.r"]
    base = _base_weights(pipe, adapter)
    pipe.load_lora_weights(dict(tensors))  # a dict carries no header: diffusers uses scale 1
    pipe.fuse_lora()
    _check_fused(pipe, adapter, shapes, base)


def test_to_peft_dora_loads_in_diffusers(tmp_path):
    gen = torch.Generator().manual_seed(13)
    torch.manual_seed(13)
    pipe = tiny_pipe()
    pipe.unet.double()
    adapter, shapes = random_adapter(pipe, gen, dora=True, unet_only=True)
    tensors, meta = to_peft(adapter)
    mags = {k: v for k, v in tensors.items() if k.endswith("lora_magnitude_vector")}
    assert len(mags) == len(adapter.modules)
    assert any(v.dim() == 4 and v.shape[0] == 1 for v in mags.values())  # conv: (1, out, 1, 1)
    assert any(v.dim() == 1 for v in mags.values())  # linear: (out,)
    assert json.loads(meta["lora_adapter_metadata"])["unet.use_dora"] is True
    save_tensors(tensors, tmp_path / "dora.safetensors", meta)
    base = _base_weights(pipe, adapter)
    pipe.load_lora_weights(str(tmp_path), weight_name="dora.safetensors")
    pipe.fuse_lora(components=["unet"])
    _check_fused(pipe, adapter, shapes, base, dora=True)
    back = from_peft(*load_tensors(tmp_path / "dora.safetensors"))
    for n, m in adapter.modules.items():
        assert torch.equal(back.modules[n].tensors["dora_scale"], m.tensors["dora_scale"])


def test_to_peft_text_encoder_2_with_text_model_child():
    from diffusers import StableDiffusionXLPipeline
    gen = torch.Generator().manual_seed(14)
    torch.manual_seed(14)
    te2 = CLIPTextModelWithProjection(_clip_config(projection_dim=8)).double()
    modules, shapes = {}, {}
    for i, (n, mod) in enumerate((n, m) for n, m in te2.named_modules() if isinstance(m, nn.Linear)):
        r = 1 + i % 3
        t = {"lora_down.weight": torch.randn(r, mod.weight.shape[1], generator=gen),
             "lora_up.weight": torch.randn(mod.weight.shape[0], r, generator=gen),
             "alpha": torch.tensor([0.5, 1.0, 3.0][i % 3] * (1 + i % 2))}
        modules[f"text_encoder_2.{n}"] = ModuleAdapter("lora", t)
        shapes[f"text_encoder_2.{n}"] = tuple(mod.weight.shape)
    assert "text_encoder_2.text_projection" in modules
    adapter = Adapter(modules)
    tensors, meta = to_peft(adapter)
    cfg = json.loads(meta["lora_adapter_metadata"])
    StableDiffusionXLPipeline.load_lora_into_text_encoder(
        tensors, network_alphas=None, text_encoder=te2, prefix="text_encoder_2", metadata=cfg)
    layers = tuner_layers(te2)
    assert {f"text_encoder_2.{n}" for n in layers} == set(modules)
    for n, layer in layers.items():
        (adapter_name,) = layer.lora_A.keys()  # diffusers names it default_0
        assert_close64(layer.get_delta_weight(adapter_name), dense_lora(modules[f"text_encoder_2.{n}"].tensors,
                                                                       shapes[f"text_encoder_2.{n}"]), n)


def test_to_peft_refuses_what_diffusers_cannot_hold():
    g = torch.Generator().manual_seed(15)
    lora = {"lora_down.weight": torch.randn(2, 8, generator=g), "lora_up.weight": torch.randn(8, 2, generator=g),
            "alpha": torch.tensor(1.0)}
    loha = {"hada_w1_a": torch.randn(8, 2), "hada_w1_b": torch.randn(2, 8), "hada_w2_a": torch.randn(8, 2),
            "hada_w2_b": torch.randn(2, 8), "alpha": torch.tensor(1.0)}
    with pytest.raises(FormatError, match="LoRA first"):
        to_peft(Adapter({"unet.a": ModuleAdapter("loha", loha)}))
    tucker = {"lora_down.weight": torch.randn(2, 8, 1, 1), "lora_mid.weight": torch.randn(2, 2, 3, 3),
              "lora_up.weight": torch.randn(8, 2, 1, 1)}
    with pytest.raises(FormatError, match="Tucker"):
        to_peft(Adapter({"unet.c": ModuleAdapter("lora", tucker)}))
    with pytest.raises(FormatError, match="mixes DoRA"):
        to_peft(Adapter({"unet.a": ModuleAdapter("lora", {**lora, "dora_scale": torch.ones(8, 1)}),
                         "unet.b": ModuleAdapter("lora", lora)}))
    with pytest.raises(FormatError, match="input channel"):
        to_peft(Adapter({"unet.a": ModuleAdapter("lora", {**lora, "dora_scale": torch.ones(1, 8) * 2}),
                         "unet.b": ModuleAdapter("lora", {**lora, "dora_scale": torch.ones(8, 1)})}))


def test_rs_lora_alpha_round_trip_keeps_delta():
    """Our rs-LoRA alpha already holds α·√r: the PEFT config must say plain alpha/r."""
    g = torch.Generator().manual_seed(16)
    r, alpha = 4, 3.0 * math.sqrt(4)
    t = {"lora_down.weight": torch.randn(r, 6, generator=g), "lora_up.weight": torch.randn(5, r, generator=g),
         "alpha": torch.tensor(alpha)}
    tensors, meta = to_peft(Adapter({"text_encoder.text_model.encoder.layers.0.mlp.fc1": ModuleAdapter("lora", t)}))
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["text_encoder.use_rslora"] is False and cfg["text_encoder.lora_alpha"] == 6
    assert cfg["text_encoder.target_modules"] == ["encoder.layers.0.mlp.fc1"]
    back = from_peft(tensors, meta)
    m = back.modules["text_encoder.text_model.encoder.layers.0.mlp.fc1"]
    assert_close64(dense_lora(m.tensors, (5, 6)), dense_lora(t, (5, 6)))


def test_generic_model_round_trip():
    g = torch.Generator().manual_seed(17)
    net = _Net()
    mods = {}
    for n, r, alpha in (("lin", 3, 1.5), ("conv", 2, 2.0), ("pw", 2, 0.5)):
        w = getattr(net, n).weight
        ks = tuple(w.shape[2:])
        mods[f"model.{n}"] = ModuleAdapter("lora", {
            "lora_down.weight": torch.randn((r, w.shape[1]) + ks, generator=g),
            "lora_up.weight": torch.randn((w.shape[0], r) + (1,) * len(ks), generator=g),
            "alpha": torch.tensor(alpha)})
    tensors, meta = to_peft(Adapter(mods))
    assert all(k.startswith("base_model.model.") for k in tensors)
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["r"] == 2 and set(cfg["target_modules"]) == {"lin", "conv", "pw"}
    # PEFT itself, given that config, builds layers with the same ΔW
    model = get_peft_model(_Net(), LoraConfig(**cfg))
    from peft import set_peft_model_state_dict
    res = set_peft_model_state_dict(model, tensors)
    assert not [k for k in res.unexpected_keys if "lora" in k]
    model.double()
    for n, layer in tuner_layers(model.base_model.model).items():
        w = layer.get_base_layer().weight
        assert_close64(layer.get_delta_weight("default"), dense_lora(mods[f"model.{n}"].tensors, tuple(w.shape)), n)
    back = from_peft(tensors, meta)
    assert set(back.modules) == set(mods)
    with pytest.raises(FormatError, match="mixed"):
        to_peft(Adapter({**mods, "unet.conv_in": mods["model.conv"]}))

"""The pipeline registry: several adapters with their own UNet/TE weights, enable/disable,
set_weights, remove, fuse/unfuse (bit-exact, also after 100 switching cycles), dyn, PEFT files,
both UNet naming styles, half precision, devices and torch.compile."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import lyco
import lyco.pipeline as lp
from lyco.errors import ConfigError, FamilyMismatch, LycoError
from _pipeline_helpers import (
    ALGOS, PRESET_FEW, PRESET_SOME, assert_close, base_pipe, differ, make_adapter_file, run, same_bits, snapshot,
)


def _no_hooks_left(pipe) -> bool:
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, comp, None)
        if m is None:
            continue
        for mod in m.modules():
            if "_lyco_host" in mod.__dict__ or "forward" in mod.__dict__:
                return False
    return True


def test_two_adapters_with_own_weights_equal_merged_weights(sd1, tmp_path):
    fa = make_adapter_file(sd1, tmp_path / "a.safetensors", ALGOS["lora"], seed=1, preset=PRESET_SOME)
    fb = make_adapter_file(sd1, tmp_path / "b.safetensors", ALGOS["loha"], seed=2, preset=PRESET_SOME)
    before = snapshot(sd1)
    y0 = run(sd1)
    lp.load(sd1, fa, multiplier=0.7, te_multiplier=0.5)
    lp.load(sd1, fb, multiplier=-0.4, te_multiplier=1.2, name="bee")
    assert [d["name"] for d in lp.list_adapters(sd1)] == ["a", "bee"]
    info = lp.list_adapters(sd1)[1]
    assert (info["unet"], info["te"], info["enabled"], info["fused"]) == (-0.4, 1.2, True, False)
    assert info["algos"] == {"loha": 105} and info["path"].endswith("b.safetensors")
    y_fly = run(sd1)

    ref = base_pipe("sd1")  # independent reference: both merged into the weights
    lyco.load(fa).merge_into(ref, 0.7, te_multiplier=0.5)
    lyco.load(fb).merge_into(ref, -0.4, te_multiplier=1.2)
    y_ref = run(ref)
    assert differ(y_fly, y0) > 0.05
    assert_close(y_fly, y_ref, 2e-4, "two adapters on the fly vs merged")

    lp.fuse(sd1)
    assert all(d["fused"] for d in lp.list_adapters(sd1))
    assert_close(run(sd1), y_ref, 2e-4, "two adapters fused vs merged")
    lp.unfuse(sd1)
    assert same_bits(before, snapshot(sd1))
    lp.remove(sd1, "a")
    lp.remove(sd1, "bee")
    assert same_bits(before, snapshot(sd1)) and _no_hooks_left(sd1) and lp.list_adapters(sd1) == []


def test_te_and_unet_multipliers_are_separate(sd1, tmp_path):
    f = make_adapter_file(sd1, tmp_path / "a.safetensors", seed=4, preset=PRESET_SOME)
    ids = sd1.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))

    def te():
        with torch.no_grad():
            return sd1.text_encoder(ids)[0]

    def unet():
        with torch.no_grad():
            return sd1.unet(x, 10, ctx).sample

    te0, u0 = te(), unet()
    lp.load(sd1, f, multiplier=1.0, te_multiplier=0.0)
    assert torch.equal(te(), te0) and differ(unet(), u0) > 1e-3
    lp.set_weights(sd1, "a", unet=0.0, te=1.0)
    assert torch.equal(unet(), u0) and differ(te(), te0) > 1e-3
    lp.set_weights(sd1, "a", te=0.5)  # unet stays at 0
    assert lp.adapters(sd1)["a"].unet == 0.0 and lp.adapters(sd1)["a"].te == 0.5
    te_half = te()
    lp.set_weights(sd1, "a", te=1.0)
    assert differ(te(), te_half) > 1e-4


def test_enable_disable_and_changes_while_fused(sd1, tmp_path):
    fa = make_adapter_file(sd1, tmp_path / "a.safetensors", ALGOS["lokr"], seed=5, preset=PRESET_SOME)
    fb = make_adapter_file(sd1, tmp_path / "b.safetensors", ALGOS["dora-lora"], seed=6, preset=PRESET_SOME)
    before = snapshot(sd1)
    y0 = run(sd1)
    lp.load(sd1, fa, 0.9)
    lp.load(sd1, fb, 0.5, enabled=False)
    ya = run(sd1)
    lp.disable(sd1, "a")
    assert torch.equal(run(sd1), y0), "all disabled: exactly the base model"
    lp.enable(sd1, "a")
    assert torch.equal(run(sd1), ya)

    # every change made while fused keeps the fused weights equal to the on-the-fly result
    lp.fuse(sd1)
    lp.enable(sd1, "b")
    lp.set_weights(sd1, "a", unet=0.3, te=-0.2)
    y_fused = run(sd1)
    lp.unfuse(sd1)
    assert same_bits(before, snapshot(sd1))
    y_fly = run(sd1)
    assert differ(y_fly, ya) > 0.01
    assert_close(y_fused, y_fly, 2e-4, "changed while fused")

    lp.fuse(sd1)
    lp.disable(sd1, "b")
    lp.remove(sd1, "a")  # removing a fused adapter unmerges it
    assert same_bits(before, snapshot(sd1)), "nothing enabled is left: the weights are the originals"
    lp.load(sd1, fa, 0.9)  # loading while fused fuses the newcomer
    assert lp.list_adapters(sd1)[-1]["fused"]
    assert_close(run(sd1), ya, 2e-4, "loaded while fused")
    lp.unfuse(sd1)
    assert same_bits(before, snapshot(sd1))
    lp.adapters(sd1).clear()
    assert _no_hooks_left(sd1)


#: the switching test attaches/fuses hundreds of times: a handful of layers of each kind
PRESET_TINY = {"unet": {"target_names": ["down_blocks.1.resnets.0", "down_blocks.1.attentions.0.proj_in",
                                         "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                         "down_blocks.1.downsamplers.0.conv"]},
               "text_encoder": {"target_names": ["text_model.encoder.layers.1.self_attn"]}, "include_conv": True}


def test_switching_100_times_leaves_base_bits_identical_bf16(tmp_path):
    """100 switches between two adapters — enable/disable with fuse/unfuse every cycle, a full
    attach/detach every fifth cycle, random weights — in bf16, where add/subtract merging drifts."""
    pipe = base_pipe("sd1", torch.bfloat16)
    maker = base_pipe("sd1")  # adapters made in fp32, applied to the bf16 pipeline
    a = lyco.load(make_adapter_file(maker, tmp_path / "a.safetensors", ALGOS["lora"], seed=7, preset=PRESET_TINY))
    b = lyco.load(make_adapter_file(maker, tmp_path / "b.safetensors", ALGOS["lokr"], seed=8, preset=PRESET_TINY))
    assert len(a.modules) == len(b.modules) == 14
    before = snapshot(pipe)
    y0 = run(pipe)
    rng = random.Random(0)
    reg = lp.adapters(pipe)
    for i in range(100):
        if i % 5 == 0:
            reg.load(a, rng.uniform(-1, 1), rng.uniform(-1, 1), name="a")
            reg.load(b, rng.uniform(-1, 1), name="b", enabled=False)
        reg.fuse()                          # a fused
        reg.disable("a")
        reg.enable("b")                     # switched to b while fused
        reg.set_weights("b", unet=rng.uniform(-2, 2))
        reg.unfuse()
        reg.disable("b")
        reg.enable("a")                     # switched back on the fly
        if i % 5 == 4:
            if i % 10 == 4:
                reg.fuse()                  # removed while fused
            reg.remove("a")
            reg.remove("b")
            reg.unfuse()
        if i % 10 == 0:
            assert not same_bits(before, snapshot(pipe)) or not reg.fused
    assert len(reg) == 0 and not reg.fused
    assert same_bits(before, snapshot(pipe))
    assert _no_hooks_left(pipe)
    assert torch.equal(run(pipe), y0)


def test_dyn_truncates_lora_rank(sd1, tmp_path):
    cfg = dict(algo="lora", rank=4, alpha=3.0)
    f = make_adapter_file(sd1, tmp_path / "a.safetensors", cfg, seed=9, preset=PRESET_SOME)
    y_full = run(sd1)
    lp.load(sd1, f, 0.8, dyn=2)
    y_dyn = run(sd1)
    # independent reference: the first two ranks sliced by hand, alpha kept (scale alpha/2)
    adapter = lyco.load(f)
    for m in adapter.modules.values():
        m.tensors["lora_up.weight"] = m.tensors["lora_up.weight"][:, :2]
        m.tensors["lora_down.weight"] = m.tensors["lora_down.weight"][:2]
    ref = base_pipe("sd1")
    adapter.merge_into(ref, 0.8)
    assert_close(y_dyn, run(ref), 2e-4, "dyn=2 vs hand-truncated")
    lp.set_weights(sd1, "a", dyn=None)
    y_back = run(sd1)
    assert differ(y_back, y_dyn) > 1e-3
    ref_full = base_pipe("sd1")
    lyco.load(f).merge_into(ref_full, 0.8)
    assert_close(y_back, run(ref_full), 2e-4, "dyn removed")
    assert differ(y_full, y_back) > 1e-3
    with pytest.raises(ConfigError):
        lp.set_weights(sd1, "a", dyn=0.5 and -1)


def test_peft_file_and_both_unet_naming_styles_attach_alike(sdxl, tmp_path):
    from lyco.formats.peft import to_peft
    from lyco.formats.safetensors_io import save_tensors
    net = lyco.create(sdxl, algo="lora", rank=4, alpha=2.0, preset="attn-mlp", seed=0)
    from _pipeline_helpers import randomise
    randomise(net, 10)
    adapter = net.to_adapter()
    net.detach()
    adapter.save(tmp_path / "ldm.safetensors")                       # SDXL default: LDM names
    adapter.save(tmp_path / "dif.safetensors", naming="diffusers")
    tensors, meta = to_peft(adapter)
    save_tensors(tensors, tmp_path / "peft.safetensors", meta)
    keys = list(lyco.formats.safetensors_io.load_tensors(tmp_path / "ldm.safetensors")[0])
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert any(k.startswith("lora_te2_") for k in keys)
    outs = {}
    for name in ("ldm", "dif", "peft"):
        e = lp.load(sdxl, tmp_path / f"{name}.safetensors", 0.75, te_multiplier=0.5)
        assert len(e.network.layers) == len(adapter.modules)
        outs[name] = run(sdxl)
        lp.remove(sdxl, name)
    y0 = run(sdxl)
    assert differ(outs["ldm"], y0) > 0.05
    assert_close(outs["dif"], outs["ldm"], 1e-5, "diffusers-named vs LDM-named")
    assert_close(outs["peft"], outs["ldm"], 1e-4, "PEFT file vs kohya file")


def test_errors_are_clear(sd1, sdxl, tmp_path):
    f = make_adapter_file(sd1, tmp_path / "sd1lora.safetensors", seed=11, preset=PRESET_FEW)
    before = snapshot(sdxl)
    with pytest.raises(FamilyMismatch, match="sd1.*sdxl"):
        lp.load(sdxl, f)
    assert same_bits(before, snapshot(sdxl)) and _no_hooks_left(sdxl) and lp.list_adapters(sdxl) == []
    lp.load(sd1, f)
    with pytest.raises(ConfigError, match="already loaded"):
        lp.load(sd1, f)
    with pytest.raises(LycoError, match="no adapter named 'nope'.*sd1lora"):
        lp.set_weights(sd1, "nope", unet=1)
    with pytest.raises(LycoError, match="no such file"):
        lp.load(sd1, tmp_path / "missing.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_the_fly_equals_fused(dtype, tmp_path):
    pipe = base_pipe("sd1", dtype)
    f = make_adapter_file(base_pipe("sd1"), tmp_path / "a.safetensors", ALGOS["lora"], seed=12, preset=PRESET_SOME)
    before = snapshot(pipe)
    y0 = run(pipe)
    lp.load(pipe, f, 0.8)
    y_fly = run(pipe)
    assert y_fly.dtype == dtype and torch.isfinite(y_fly).all()
    lp.fuse(pipe)
    y_fused = run(pipe)
    lp.unfuse(pipe)
    assert same_bits(before, snapshot(pipe))
    ref = base_pipe("sd1")
    lyco.load(f).merge_into(ref, 0.8)
    y_ref = run(ref)
    effect = differ(y_ref, run(base_pipe("sd1")))
    assert differ(y_fly, y0) > 0.3 * effect
    tol = 0.05 * effect  # half-precision activations over two denoising steps
    assert_close(y_fly, y_ref, tol, f"{dtype} on the fly vs fp32 merged")
    assert_close(y_fused, y_ref, tol, f"{dtype} fused vs fp32 merged")


def test_adapters_follow_the_pipeline_to_another_device(sd1, tmp_path):
    """Attached on CPU, then ``pipe.to(...)``: the adapter tensors follow before the moved UNet or text
    encoder runs (the meta device stands in for CUDA on a CPU-only machine)."""
    f = make_adapter_file(sd1, tmp_path / "a.safetensors", seed=13, preset=PRESET_FEW)
    e = lp.load(sd1, f)
    te_layers = [l for l in e.network.layers.values() if l.name.startswith("text_encoder.")]
    unet_layers = [l for l in e.network.layers.values() if l.name.startswith("unet.")]
    assert te_layers and unet_layers
    assert all(t.device.type == "cpu" for l in e.network.layers.values() for t in l.tensors().values())

    def call_pre_hooks(module):  # what module(...) runs first (a meta forward cannot run to the end)
        for hook in module._forward_pre_hooks.values():
            hook(module, ())

    sd1.to("meta")
    call_pre_hooks(sd1.text_encoder)
    assert all(t.device.type == "meta" for l in te_layers for t in l.tensors().values())
    assert all(t.device.type == "cpu" for l in unet_layers for t in l.tensors().values())
    call_pre_hooks(sd1.unet)
    assert all(t.device.type == "meta" for l in unet_layers for t in l.tensors().values())
    lp.remove(sd1, "a")
    assert not sd1.unet._forward_pre_hooks and not sd1.text_encoder._forward_pre_hooks


def test_torch_compile_with_adapter_matches_eager():
    """A compiled UNet with adapters attached gives the eager output, also after the weights change,
    after disable and while fused, in one graph (``fullgraph=True``: an adapter that broke the graph
    would fail here). backend="eager" keeps this CPU test fast (dynamo still traces the patched
    forwards and the registry's device hook; no code generation); the UNet is a one-block tiny
    config and the adapter sits on one Linear and one k×k conv, because tracing time (~10 s for
    this UNet on one thread) grows with the model and every weight change re-traces."""
    from diffusers import UNet2DConditionModel

    from lyco.models.tiny import randomize_
    from _pipeline_helpers import randomise
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()
    randomize_(unet, 0)

    class Pipe:  # the registry needs only an object with a .unet
        pass

    pipe = Pipe()
    pipe.unet = unet
    preset = {"unet": {"target_names": ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                                        "down_blocks.0.resnets.0.conv1"]}, "include_conv": True}
    net = lyco.create({"unet": unet}, algo="lora", rank=2, alpha=1.0, preset=preset, seed=0)
    assert len(net.layers) == 2
    randomise(net, 14)
    adapter = net.to_adapter()
    net.detach()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(1))

    def eager():
        return unet(x, 10, ctx).sample

    with torch.no_grad():
        y0 = eager()
        lp.load(pipe, adapter, 0.8, name="a")
        compiled = torch.compile(unet, backend="eager", fullgraph=True)
        y1 = compiled(x, 10, ctx).sample
        assert differ(y1, y0) > 1e-3
        torch.testing.assert_close(y1, eager(), rtol=1e-5, atol=1e-6)
        lp.set_weights(pipe, "a", unet=-0.5)
        torch.testing.assert_close(compiled(x, 10, ctx).sample, eager(), rtol=1e-5, atol=1e-6)
        assert differ(eager(), y1) > 1e-3
        lp.disable(pipe, "a")
        assert torch.equal(compiled(x, 10, ctx).sample, y0)
        lp.enable(pipe, "a")
        lp.fuse(pipe)
        y_fused = compiled(x, 10, ctx).sample
        lp.unfuse(pipe)
        torch.testing.assert_close(y_fused, eager(), rtol=1e-4, atol=1e-5)

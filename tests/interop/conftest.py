"""Shared pieces of the interop proof: tiny SD1/SDXL models, LyCORIS 4.1.3 as an oracle, an
independent diffusers→LDM name table, and a few helpers.

Everything here is deliberately independent of lyco's own naming/algorithm code, so the tests
compare lyco against something it did not compute itself:

* the tiny models are ``lyco.models.tiny`` (real block structure, tiny widths) when it works,
  otherwise built here from diffusers/transformers configs;
* the diffusers→LDM/SGM table is ecosystem.md §1.2 (kohya ``make_unet_conversion_map``) and the
  A1111 SD1 upsampler rule (§2.2), written out again;
* :func:`ldm_view` builds an *LDM-named view* of a diffusers UNet (the same leaf modules under
  ``input_blocks``/``middle_block``/``output_blocks``, block containers keeping the kohya class
  names ``Transformer2DModel``/``ResnetBlock2D``/...). LyCORIS walking that view names modules
  exactly as it does on kohya's SDXL UNet, which is how real SDXL LyCORIS files look.

The helpers are handed to the tests through the session fixture ``ix`` (a namespace).
"""

from __future__ import annotations

import copy
import logging
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

torch.set_num_threads(1)

FAMILIES = ("sd1", "sdxl")
#: up blocks that hold attentions (decides the LDM index of their upsampler), per family
UP_HAS_ATTN = {"sd1": (False, True, True, True), "sdxl": (True, True, False)}

# --------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------


def _own_components(family: str) -> dict[str, nn.Module]:
    """Fallback when lyco.models.tiny is missing: SD1/SDXL-shaped tiny models from configs."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=4)
    text = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                bos_token_id=98, eos_token_id=99, pad_token_id=99)
    torch.manual_seed(0)
    if family == "sd1":
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16, 16, 16), cross_attention_dim=16, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **common)
        return {"unet": unet, "text_encoder": CLIPTextModel(CLIPTextConfig(**text))}
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16), cross_attention_dim=32, attention_head_dim=(1, 2, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16, **common)
    return {"unet": unet, "text_encoder": CLIPTextModel(CLIPTextConfig(**text)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**text))}


def build_components(family: str) -> dict[str, nn.Module]:
    try:
        from lyco.models.tiny import tiny_components
        comps = tiny_components(family, seed=0)
    except ImportError:
        comps = _own_components(family)
    for m in comps.values():
        m.eval().requires_grad_(False)
    return comps


class Model:
    """One tiny model family: components, fixed random inputs and the base outputs."""

    def __init__(self, family: str):
        self.family = family
        self.comps = build_components(family)
        unet = self.comps["unet"]
        g = torch.Generator().manual_seed(1234)
        te = self.comps["text_encoder"]
        vocab = te.config.vocab_size
        self.sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
        self.timesteps = torch.tensor([17, 601])
        self.context = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
        self.ids = torch.randint(0, vocab - 2, (2, 6), generator=g)
        self.added = None
        if family == "sdxl":
            te2 = self.comps["text_encoder_2"]
            tdim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            assert tdim == te2.config.projection_dim
            self.added = {"text_embeds": torch.randn(2, tdim, generator=g),
                          "time_ids": torch.tensor([[64., 64., 0., 0., 64., 64.]] * 2)}
        self.base = self.run()

    def clone(self) -> dict[str, nn.Module]:
        return copy.deepcopy(self.comps)

    @torch.no_grad()
    def run(self, comps=None) -> dict[str, torch.Tensor]:
        """Every output that depends on adapted layers: UNet noise prediction, TE hidden states."""
        c = comps or self.comps
        out = {}
        kw = {"added_cond_kwargs": self.added} if self.added is not None else {}
        out["unet"] = c["unet"](self.sample, self.timesteps, self.context, **kw).sample
        out["text_encoder"] = c["text_encoder"](self.ids).last_hidden_state
        if "text_encoder_2" in c:
            o = c["text_encoder_2"](self.ids)
            out["text_encoder_2"] = o.last_hidden_state
            out["text_encoder_2.proj"] = o.text_embeds
        return out


@pytest.fixture(scope="session")
def sd1() -> Model:
    return Model("sd1")


@pytest.fixture(scope="session")
def sdxl() -> Model:
    return Model("sdxl")


@pytest.fixture(autouse=True)
def _shared_models_stay_clean(request):
    """The shared models are attached to and detached from: each test must leave them untouched."""
    yield
    for fam in FAMILIES:
        if fam in request.fixturenames:
            model = request.getfixturevalue(fam)
            for comp, root in model.comps.items():
                for name, mod in root.named_modules():
                    assert "_lyco_host" not in mod.__dict__, f"{fam}.{comp}.{name}: adapter left attached"
                    assert "forward" not in mod.__dict__, f"{fam}.{comp}.{name}: forward left patched"


# --------------------------------------------------------------------------------------
# toy model for the generic ``lycoris_`` prefix
# --------------------------------------------------------------------------------------


class Toy(nn.Module):
    """Every layer kind LyCORIS wraps: Conv3d → GroupNorm → Conv2d (3×3, 1×1) → Conv1d → LayerNorm → Linear."""

    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.conv2d = nn.Conv2d(8, 16, 3, padding=1)
        self.proj = nn.Conv2d(16, 16, 1)
        self.conv1d = nn.Conv1d(16, 16, 3, padding=1)
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 8)
        self.head = nn.Linear(8, 8, bias=False)

    def forward(self, x):  # (B, 3, 4, 6, 6)
        h = self.gn(self.conv3d(x)).mean(2)
        h = self.proj(torch.relu(self.conv2d(h)))
        h = self.conv1d(h.flatten(2)).transpose(1, 2)
        return self.head(torch.relu(self.fc(self.ln(h))))


def make_toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    toy = Toy()
    with torch.no_grad():  # non-trivial norm affine parameters
        for m in (toy.gn, toy.ln):
            m.weight.add_(0.2 * torch.randn_like(m.weight))
            m.bias.add_(0.2 * torch.randn_like(m.bias))
    return toy.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------
# diffusers → LDM/SGM names (ecosystem.md §1.2 and §2.2, written out independently)
# --------------------------------------------------------------------------------------

_RESNET_INNER = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                 "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_EMB_INNER = {"linear_1": "0", "linear_2": "2"}


def ldm_block(path: str, family: str):
    """A diffusers *block* path → (LDM block path, inner rename table), or None if not a block."""
    up_attn = UP_HAS_ATTN[family]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)", path)
    if m:
        i, j = int(m[1]), int(m[3])
        if m[2] == "resnets":
            return f"input_blocks.{3 * i + j + 1}.0", _RESNET_INNER
        return f"input_blocks.{3 * i + j + 1}.1", {}
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0", path)
    if m:
        return f"input_blocks.{3 * (int(m[1]) + 1)}.0", {"conv": "op"}
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)", path)
    if m:
        return (f"middle_block.{2 * int(m[2])}", _RESNET_INNER) if m[1] == "resnets" else ("middle_block.1", {})
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)", path)
    if m:
        i, j = int(m[1]), int(m[3])
        if m[2] == "resnets":
            return f"output_blocks.{3 * i + j}.0", _RESNET_INNER
        return f"output_blocks.{3 * i + j}.1", {}
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0", path)
    if m:
        i = int(m[1])
        return f"output_blocks.{3 * i + 2}.{2 if up_attn[i] else 1}", {}
    if path == "time_embedding":
        return "time_embed", _EMB_INNER
    if path == "add_embedding":
        return "label_emb.0", _EMB_INNER
    top = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if path in top:
        return top[path], {}
    return None


def diffusers_to_ldm(path: str, family: str) -> str:
    """A dotted diffusers UNet module path → its LDM/SGM path (the block prefix is renamed, and
    the first component inside a ResNet/embedding/downsampler block)."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        hit = ldm_block(".".join(parts[:n]), family)
        if hit is not None:
            block, inner = hit
            rest = parts[n:]
            if rest and rest[0] in inner:
                rest = inner[rest[0]].split(".") + rest[1:]
            return ".".join([block] + rest)
    raise KeyError(f"{path!r} is not in the diffusers→LDM table")


_VIEW_CLASSES: dict[str, type] = {}


def _container(cls_name: str) -> nn.Module:
    """An empty module whose class is *named* like a diffusers/kohya block (class-name targeting)."""
    if cls_name not in _VIEW_CLASSES:
        _VIEW_CLASSES[cls_name] = type(cls_name, (nn.Module,), {})
    return _VIEW_CLASSES[cls_name]()


def _put(root: nn.Module, path: str, module: nn.Module) -> None:
    parent = root
    *heads, last = path.split(".")
    for h in heads:
        if h not in parent._modules:
            parent.add_module(h, nn.Module())
        parent = parent._modules[h]
    assert last not in parent._modules, f"view path {path!r} used twice"
    parent.add_module(last, module)


def ldm_view(unet: nn.Module, family: str) -> nn.Module:
    """The same layers as ``unet`` under LDM/SGM names (a view: no copies, no forward).

    Attention and upsampler blocks (no renames inside) are the diffusers modules themselves;
    ResNet, downsampler and embedding blocks are containers of the same class name holding the
    renamed leaves, like kohya's ``SdxlUNet2DConditionModel``."""
    view = nn.Module()
    for path, mod in unet.named_modules():
        hit = ldm_block(path, family)
        if hit is None:
            continue
        block, inner = hit
        if not inner:
            _put(view, block, mod)
            continue
        box = _container(type(mod).__name__)
        for sub, leaf in mod.named_modules():
            if sub and not leaf._modules and any(True for _ in leaf.parameters(recurse=False)):
                head, *tail = sub.split(".")
                _put(box, ".".join([inner.get(head, head)] + tail), leaf)
        _put(view, block, box)
    n_view = sum(1 for m in view.modules() if not m._modules and any(True for _ in m.parameters(recurse=False)))
    n_unet = sum(1 for m in unet.modules() if not m._modules and any(True for _ in m.parameters(recurse=False)))
    assert n_view == n_unet, f"the LDM view lost layers ({n_view} of {n_unet})"
    return view


class TextModelView(nn.Module):
    """A transformers-5 ``CLIPTextModel`` (no ``text_model`` level) under a ``text_model`` level,
    as transformers 4 — and every kohya/LyCORIS file — names it."""

    def __init__(self, te: nn.Module):
        super().__init__()
        self.text_model = te

    def forward(self, *a, **k):
        return self.text_model(*a, **k)


def te_view(te: nn.Module) -> nn.Module:
    return te if hasattr(te, "text_model") else TextModelView(te)


# --------------------------------------------------------------------------------------
# randomising adapter parameters (never test on zero deltas)
# --------------------------------------------------------------------------------------


@torch.no_grad()
def randomise_(named_params, seed: int = 0, scale: float = 0.5) -> int:
    """Add fan-in scaled noise to every adapter parameter (zero-initialised ones included).

    ``dora_scale`` is multiplied by a positive factor, OFT blocks get a smaller rotation. Returns
    how many tensors were changed."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in named_params:
        if not p.is_floating_point():
            continue
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "dora_scale" in name:
            p.mul_((1.0 + 0.3 * noise.abs()).to(p.dtype))
        elif "oft_blocks" in name:
            p.add_((0.3 * noise / p.shape[-1]).to(p.dtype))
        elif "rescale" in name:
            p.add_((0.2 * noise).to(p.dtype))
        else:
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else (p.shape[0] if p.dim() == 1 else 1)
            p.add_((scale * noise / math.sqrt(fan_in)).to(p.dtype))
        n += 1
    return n


def lyco_randomise_(net, seed: int = 0) -> int:
    return randomise_(((n, p) for layer in net.layers.values() for n, p in layer.params.items()), seed)


# --------------------------------------------------------------------------------------
# LyCORIS 4.1.3 (the oracle)
# --------------------------------------------------------------------------------------

#: kohya preset keys (all of them, so LyCORIS's class-level preset state is fully determined)
_KOHYA_KEYS = ("enable_conv", "unet_target_module", "unet_target_name", "text_encoder_target_module",
               "text_encoder_target_name", "module_algo_map", "name_algo_map", "use_fnmatch", "exclude_name")
_WRAPPER_KEYS = ("enable_conv", "target_module", "target_name", "module_algo_map", "name_algo_map",
                 "lora_prefix", "use_fnmatch", "exclude_name")


class Lycoris:
    def __init__(self):
        import lycoris
        import lycoris.kohya
        from lycoris.config import PRESET
        from lycoris.logging import logger
        logger.setLevel(logging.ERROR)
        self.lib = lycoris
        self.kohya = lycoris.kohya
        self.PRESET = PRESET
        self._n = 0
        # create_network_from_weights first builds a whole network from the *current* class-level
        # preset; the default one (with TimestepEmbedding, see kohya_preset) dies on any SD UNet
        self.kohya.LycorisNetworkKohya.apply_preset(self.kohya_preset("full"))

    def kohya_preset(self, name: str = "full", **changes) -> dict:
        """A builtin kohya preset, completed with every key, minus ``TimestepEmbedding``.

        LyCORIS 4.1.3 lists the class ``TimestepEmbedding`` (for Anima) next to the names
        ``time_embedding.linear_1/2`` in ``full``/``full-lin``/``unet-only``; on any diffusers
        (or sd-scripts) SD UNet that targets the time embedding twice and create_network dies
        with "duplicated lora name". Dropping the class gives the set the preset means."""
        p = {"module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False, "exclude_name": [],
             **copy.deepcopy(self.PRESET[name])}
        p["unet_target_module"] = [c for c in p["unet_target_module"] if c != "TimestepEmbedding"]
        p.update(changes)
        assert set(p) == set(_KOHYA_KEYS), sorted(p)
        return p

    def _register(self, preset: dict) -> str:
        self._n += 1
        name = f"lyco-interop-{self._n}"
        self.PRESET[name] = preset
        return name

    def create_network(self, comps: dict, algo: str, *, dim=4, alpha=2.0, multiplier=1.0,
                       preset: dict | None = None, unet=None, te_views=True, **kw):
        """``lycoris.kohya.create_network`` on the components' UNet (or ``unet``, e.g. an LDM view)
        and text encoder(s) (a list for SDXL; under a ``text_model`` level unless ``te_views`` is
        False), applied and in eval mode (its parameters are still LyCORIS's initial ones)."""
        tes = [comps[k] for k in ("text_encoder", "text_encoder_2") if k in comps]
        if te_views:
            tes = [te_view(t) for t in tes]
        te_arg = tes if len(tes) > 1 else tes[0]
        name = self._register(preset or self.kohya_preset("full"))
        net = self.kohya.create_network(multiplier, dim, alpha, None, te_arg, unet or comps["unet"],
                                        algo=algo, preset=name, **kw)
        net.apply_to(te_arg, unet or comps["unet"], apply_text_encoder=True, apply_unet=True)
        net.eval()
        return net

    def from_weights(self, multiplier, path, te, unet, apply: bool = True):
        """``lycoris.kohya.create_network_from_weights`` (+ ``apply_to``), what inference tools call.

        It first builds (and throws away) a whole network from the class-level preset; an empty
        preset keeps that cheap without changing what is loaded from the file."""
        self.kohya.LycorisNetworkKohya.apply_preset(
            self.kohya_preset("full", enable_conv=False, unet_target_module=[], unet_target_name=[],
                              text_encoder_target_module=[]))
        net, sd = self.kohya.create_network_from_weights(multiplier, str(path), None, te, unet, for_inference=True)
        if apply:
            net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
            net.eval()
        return net, sd

    def wrapper_preset(self, **changes) -> dict:
        p = {"enable_conv": True, "target_module": ["Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"],
             "target_name": [], "module_algo_map": {}, "name_algo_map": {}, "lora_prefix": "lycoris",
             "use_fnmatch": False, "exclude_name": []}
        p.update(changes)
        assert set(p) == set(_WRAPPER_KEYS)
        return p

    def create_lycoris(self, module, algo, *, dim=4, alpha=2.0, multiplier=1.0, preset=None, **kw):
        name = self._register(preset or self.wrapper_preset())
        net = self.lib.create_lycoris(module, multiplier, dim, alpha, algo=algo, preset=name, **kw)
        net.apply_to()
        net.eval()
        return net


@pytest.fixture(scope="session")
def lyc() -> Lycoris:
    return Lycoris()


# --------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------

#: (rtol, atol relative to the reference's largest magnitude) per file dtype
TOL = {torch.float32: (1e-4, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def assert_outputs_close(got: dict, ref: dict, base: dict | None = None, dtype=torch.float32,
                         what: str = "", min_effect: float = 0.02, keys=None) -> None:
    """Every output (or those in ``keys``) equal within the dtype's tolerance; and (given the base
    outputs) the adapter must change each of them noticeably, so a dropped module or a zero delta
    cannot pass."""
    rtol, atol = TOL[dtype]
    assert set(got) == set(ref)
    for k in keys or ref:
        r, o = ref[k].double(), got[k].double()
        scale = float(r.abs().max())
        err = float((o - r).abs().max())
        assert err <= atol * scale + rtol * scale, f"{what} {k}: max |Δ| {err:.3g} (scale {scale:.3g})"
        if base is not None:
            eff = float((r - base[k].double()).abs().max())
            assert eff > min_effect * scale, f"{what} {k}: the adapter barely changes the output ({eff:.3g})"


def max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max()) for k in b)


TE_KEYS = ("text_encoder",)


@pytest.fixture(scope="session")
def ix():
    """The helpers, as one namespace (conftest functions are not importable by name)."""
    return SimpleNamespace(
        Model=Model, make_toy=make_toy, Toy=Toy, ldm_view=ldm_view, diffusers_to_ldm=diffusers_to_ldm,
        ldm_block=ldm_block, te_view=te_view, TextModelView=TextModelView, randomise_=randomise_,
        lyco_randomise_=lyco_randomise_, assert_outputs_close=assert_outputs_close,
        max_rel_diff=max_rel_diff, TOL=TOL, UP_HAS_ATTN=UP_HAS_ATTN, TE_KEYS=TE_KEYS)

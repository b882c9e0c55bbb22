"""The real architecture configs of SD 1.5, SD 2.1 (768-v) and SDXL base 1.0, as plain dicts.

The values are those of the official diffusers ``config.json`` files of
``stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-2-1`` and
``stabilityai/stable-diffusion-xl-base-1.0`` (unet, vae, text_encoder(s), scheduler). Nothing here
downloads anything: the builders instantiate modules straight from these dicts.

Use ``build_unet("sdxl")`` (meta device by default) to get the real module tree for name tables in
a fraction of a second; ``device="cpu"`` gives a randomly initialised full-size model.

Every config dict carries its class: ``_class_name`` for diffusers components, ``architectures[0]``
for transformers text encoders. ``build_from_config(cfg)`` dispatches on it.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch

from lyco.errors import ConfigError

FAMILIES = ("sd1", "sd2", "sdxl")

#: Components of a pipeline of each family that carry weights, in file order.
COMPONENTS = {
    "sd1": ("unet", "vae", "text_encoder"),
    "sd2": ("unet", "vae", "text_encoder"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
}

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

UNET: dict[str, dict[str, Any]] = {
    "sd1": {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": list(_SD_DOWN),
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": list(_SD_UP),
    },
    "sd2": {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 1024,
        "down_block_types": list(_SD_DOWN),
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "sample_size": 96,
        "up_block_types": list(_SD_UP),
        "upcast_attention": True,
        "use_linear_projection": True,
    },
    "sdxl": {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": None,
        "use_linear_projection": True,
    },
}


def _vae(sample_size: int, scaling_factor: float, **extra) -> dict[str, Any]:
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        **extra,
    }


VAE: dict[str, dict[str, Any]] = {
    "sd1": _vae(512, 0.18215),
    "sd2": _vae(768, 0.18215),
    "sdxl": _vae(1024, 0.13025, force_upcast=True),
}


def _clip_text(arch: str, *, hidden: int, layers: int, heads: int, intermediate: int, act: str,
               projection_dim: int) -> dict[str, Any]:
    return {
        "architectures": [arch],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": act,
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": projection_dim,
        "vocab_size": 49408,
    }


#: CLIP ViT-L/14 text tower (SD1 and SDXL's first encoder).
CLIP_L = _clip_text("CLIPTextModel", hidden=768, layers=12, heads=12, intermediate=3072,
                    act="quick_gelu", projection_dim=768)
#: OpenCLIP ViT-H/14 text tower as diffusers ships it for SD 2.x: 23 of its 24 layers (the
#: original runs the penultimate layer's output through ln_final), no projection used.
OPENCLIP_H = _clip_text("CLIPTextModel", hidden=1024, layers=23, heads=16, intermediate=4096,
                        act="gelu", projection_dim=512)
#: OpenCLIP ViT-bigG/14 text tower (SDXL's second encoder), all 32 layers plus the projection.
OPENCLIP_BIGG = _clip_text("CLIPTextModelWithProjection", hidden=1280, layers=32, heads=20,
                           intermediate=5120, act="gelu", projection_dim=1280)

TEXT_ENCODER: dict[str, dict[str, Any]] = {"sd1": CLIP_L, "sd2": OPENCLIP_H, "sdxl": CLIP_L}
TEXT_ENCODER_2: dict[str, dict[str, Any]] = {"sdxl": OPENCLIP_BIGG}

SCHEDULER: dict[str, dict[str, Any]] = {
    "sd1": {
        "_class_name": "PNDMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
    "sd2": {
        "_class_name": "DDIMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
    "sdxl": {
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    },
}

_TABLES = {
    "unet": UNET,
    "vae": VAE,
    "text_encoder": TEXT_ENCODER,
    "text_encoder_2": TEXT_ENCODER_2,
    "scheduler": SCHEDULER,
}


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family


def get_config(family: str, component: str) -> dict[str, Any]:
    """A deep copy of the real config of ``component`` ("unet", "vae", "text_encoder",
    "text_encoder_2", "scheduler") of ``family``."""
    check_family(family)
    table = _TABLES.get(component)
    if table is None:
        raise ConfigError(f"unknown component {component!r}; expected one of {', '.join(_TABLES)}")
    if family not in table:
        raise ConfigError(f"model family {family!r} has no component {component!r}")
    return copy.deepcopy(table[family])


def all_configs(family: str) -> dict[str, dict[str, Any]]:
    """All component configs of a family, including the scheduler's."""
    out = {c: get_config(family, c) for c in COMPONENTS[check_family(family)]}
    out["scheduler"] = get_config(family, "scheduler")
    return out


def class_name(cfg: Mapping[str, Any]) -> str:
    if "_class_name" in cfg:
        return str(cfg["_class_name"])
    arch = cfg.get("architectures") or []
    if arch:
        return str(arch[0])
    raise ConfigError("component config names no class (neither '_class_name' nor 'architectures')")


def family_of_unet_config(cfg: Mapping[str, Any]) -> str:
    """sdxl when the UNet has SDXL's text-time embedding (or a 2048-dim context); sd2 for a
    1024-dim context or linear ``proj_in``/``proj_out`` (SD 1.x always uses 1×1 convs there, SD 2.x
    always Linear); else sd1. Works for the tiny models too (their widths are not the real ones)."""
    cross = cfg.get("cross_attention_dim")
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    if cfg.get("addition_embed_type") == "text_time" or cross == 2048:
        return "sdxl"
    if cross == 1024 or cfg.get("use_linear_projection"):
        return "sd2"
    return "sd1"


def _device_ctx(device):
    return torch.device(device) if device is not None else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build_from_config(cfg: Mapping[str, Any], *, device: str | torch.device | None = "meta",
                      dtype: torch.dtype | None = None):
    """Instantiate a diffusers model, transformers CLIP text model or diffusers scheduler from one
    of the config dicts above (or one saved by ``config.to_dict()`` / ``dict(model.config)``).

    ``device="meta"`` builds the module tree without allocating or initialising weights (fast);
    ``device="cpu"`` builds a randomly initialised model.
    """
    name = class_name(cfg)
    body = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if name.endswith("Scheduler"):
        import diffusers

        cls = getattr(diffusers, name, None)
        if cls is None:
            raise ConfigError(f"unknown scheduler class {name!r}")
        return cls.from_config(body)
    if name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        import transformers
        from transformers import CLIPTextConfig

        body.pop("architectures", None)
        conf = CLIPTextConfig(**{k: v for k, v in body.items()
                                 if k not in ("transformers_version", "model_type", "torch_dtype", "dtype")})
        conf.architectures = [name]
        cls = getattr(transformers, name)
        with _device_ctx(device):
            model = cls(conf)
    elif name in ("UNet2DConditionModel", "AutoencoderKL"):
        import diffusers

        cls = getattr(diffusers, name)
        with _device_ctx(device):
            model = cls.from_config(body)
    else:
        raise ConfigError(f"unsupported component class {name!r}")
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()


def build_unet(family: str, device: str | torch.device | None = "meta", dtype: torch.dtype | None = None):
    """The real UNet2DConditionModel of ``family`` (meta device by default: names and shapes only)."""
    return build_from_config(get_config(family, "unet"), device=device, dtype=dtype)


def build_vae(family: str, device: str | torch.device | None = "meta", dtype: torch.dtype | None = None):
    return build_from_config(get_config(family, "vae"), device=device, dtype=dtype)


def build_text_encoder(family: str, index: int = 1, device: str | torch.device | None = "meta",
                       dtype: torch.dtype | None = None):
    """Text encoder 1 (``text_encoder``) or 2 (``text_encoder_2``, SDXL only)."""
    comp = "text_encoder" if index == 1 else "text_encoder_2" if index == 2 else None
    if comp is None:
        raise ConfigError(f"text encoder index must be 1 or 2, got {index!r}")
    return build_from_config(get_config(family, comp), device=device, dtype=dtype)


def build_scheduler(family: str):
    return build_from_config(get_config(family, "scheduler"))


def build_components(family: str, device: str | torch.device | None = "meta",
                     dtype: torch.dtype | None = None, components=None) -> dict[str, Any]:
    """``{"unet": …, "vae": …, "text_encoder": …, ("text_encoder_2": …)}`` of the real family."""
    wanted = components or COMPONENTS[check_family(family)]
    return {c: build_from_config(get_config(family, c), device=device, dtype=dtype) for c in wanted}


def assemble_pipeline(family: str, components: dict[str, Any], scheduler, tokenizer, tokenizer_2=None):
    """Build the diffusers pipeline of ``family`` from ready modules."""
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=components["vae"], text_encoder=components["text_encoder"],
            text_encoder_2=components["text_encoder_2"], tokenizer=tokenizer, tokenizer_2=tokenizer_2,
            unet=components["unet"], scheduler=scheduler, force_zeros_for_empty_prompt=True,
            add_watermarker=False)
    if family in ("sd1", "sd2"):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=tokenizer,
            unet=components["unet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    raise ConfigError(f"unknown model family {family!r}")

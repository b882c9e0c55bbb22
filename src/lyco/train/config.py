"""Training configuration: a TOML file → validated dataclasses; every option is also a flag.

A config has one table per concern — ``[model]``, ``[data]``, ``[network]`` (with
``[network.options]`` and ``[[network.overrides]]``), ``[optimizer]``, ``[train]``, ``[output]``,
``[sample]``, ``[eval]`` and ``[distributed]``. Every key is declared once below with its type,
default and help text; the TOML reader, the command-line flags (:func:`add_flags` / :func:`apply_flags`), the
commented example file (:func:`commented_toml`) and the ``ss_*`` metadata all come from these
declarations, so they cannot drift apart.

Rules:

* an unknown table or key is a :class:`~lyco.errors.ConfigError` naming it (with a "did you mean");
* values are type-checked strictly (``rank = "8"`` is an error; an integer is accepted where a
  float is expected);
* relative paths in a file are relative to **the file's folder**; on the command line they are
  relative to the current directory;
* flags override the file: ``--learning-rate 1e-3`` sets ``[optimizer] learning_rate``. The flag of
  a key is ``--key-name`` (``--sample-…``/``--eval-…`` for the ``[sample]``/``[eval]`` tables);
  underscores are accepted too (``--learning_rate``, as in kohya).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError

# --------------------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------------------


def opt(default, help: str, *, flag: str | None = None, path: bool = False, choices=None,
        factory=None, hidden_in_example: bool = False):
    """A config key: its default, help text and (optionally) flag name, path-ness and choices."""
    md = {"help": help, "flag": flag, "path": path, "choices": tuple(choices) if choices else None,
          "hidden": hidden_in_example}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


#: The annotation of a key that is ``"auto"``, ``true`` or ``false``: its value is the string ``"auto"`` or a
#: bool (``"true"``/``"false"`` strings are read as the bools); its flag is ``--key`` / ``--no-key``.
AutoBool = typing.Union[bool, typing.Literal["auto"]]

FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")
MIXED_PRECISION = ("no", "fp16", "bf16")
SAVE_DTYPES = ("fp32", "fp16", "bf16")
SAMPLERS = ("default", "ddim", "euler", "euler_a", "dpmpp_2m", "pndm", "ddpm")
LOGGERS = ("auto", "tensorboard", "none")


@dataclass
class ModelConfig:
    """[model] — the base model."""
    path: str = opt("", "base model: a diffusers folder, a single-file SD1/SD2/SDXL checkpoint "
                        "(.safetensors), or a built-in tiny model 'tiny:sd1' / 'tiny:sd2' / 'tiny:sdxl'",
                    flag="model", path=True)
    family: str = opt("", "model family: sd1, sd2 or sdxl ('' = detect from the model)",
                      choices=("",) + FAMILIES)
    prediction_type: str = opt("", "what the UNet predicts: epsilon or v_prediction ('' = read the "
                                   "model's scheduler config)", choices=("",) + PREDICTION_TYPES)
    tokenizer: str = opt("", "folder holding the CLIP tokenizer (vocab.json, merges.txt) for a single-file "
                             "checkpoint; a diffusers folder brings its own", path=True)
    tokenizer_2: str = opt("", "SDXL: folder of the second tokenizer (single-file checkpoints)", path=True)
    clip_skip: int = opt(1, "use the output of the N-th last text-encoder layer (kohya semantics: 1 = last, "
                            "2 = penultimate); SDXL always uses the penultimate layers")


@dataclass
class DataConfig:
    """[data] — images, captions and augmentation."""
    train_dir: str = opt("", "folder of training images with same-name .txt captions; kohya repeat "
                             "folders 'N_name' inside it are used with N repeats", path=True)
    reg_dir: str = opt("", "optional folder of regularisation (prior) images, same layout ('' = none)",
                       path=True)
    prior_loss_weight: float = opt(1.0, "loss weight of regularisation images")
    repeats: int = opt(1, "repeats of images placed directly in train_dir (N_name folders give their own)")
    caption_extension: str = opt(".txt", "caption file extension")
    trigger_word: str = opt("", "word put first in every training caption (not in regularisation "
                                "captions); also the caption of images without a caption file")
    shuffle_caption: bool = opt(False, "shuffle the comma-separated tags of each caption")
    keep_tokens: int = opt(0, "keep the first N tags in place when shuffling or dropping tags "
                              "(the trigger word counts as one)")
    caption_separator: str = opt(",", "tag separator for shuffle_caption / keep_tokens / tag dropout")
    caption_dropout_rate: float = opt(0.0, "probability of training a sample with an empty caption")
    caption_dropout_every_n_epochs: int = opt(0, "drop all captions every N-th epoch (0 = never)")
    caption_tag_dropout_rate: float = opt(0.0, "probability of dropping each tag (kept tags excepted)")
    resolution: list[int] = opt(None, "training resolution: [width, height], or one number for a square",
                                factory=lambda: [512, 512])
    enable_bucket: bool = opt(True, "aspect-ratio bucketing: images are resized/cropped to the nearest "
                                    "bucket of about the same area instead of a square")
    min_bucket_reso: int = opt(256, "smallest bucket side")
    max_bucket_reso: int = opt(1024, "largest bucket side")
    bucket_reso_steps: int = opt(64, "bucket sides are multiples of this (use 8 or more; 64 for SDXL)")
    bucket_no_upscale: bool = opt(False, "never upscale: small images get a bucket of their own size")
    flip_aug: bool = opt(False, "random horizontal flip")
    cache_latents: bool = opt(True, "encode every image once and keep the latents on disk, keyed by "
                                    "image hash and VAE hash (a second run starts fast)")
    cache_dir: str = opt("", "latent cache folder ('' = <output_dir>/cache)", path=True)
    cache_text_encoder_outputs: bool = opt(True, "remember text-encoder outputs per caption when the text "
                                                 "encoder is not trained")
    num_workers: int = opt(0, "data loader worker processes")


@dataclass
class NetworkConfig:
    """[network] — which adapter, where (preset + overrides)."""
    algo: str = opt("lora", "algorithm: lora (locon), loha, lokr, ia3, glora, full, diag-oft, boft, dylora, norm")
    rank: int = opt(8, "rank (LoKr: rank of the decomposed factor; OFT: block size)")
    alpha: float | None = opt(None, "alpha (scale = alpha/rank); unset = rank (scale 1)")
    conv_rank: int | None = opt(None, "rank of k×k convolutions (unset = rank)")
    conv_alpha: float | None = opt(None, "alpha of k×k convolutions (unset = alpha)")
    preset: str = opt("attn-mlp", "which layers: attn-only, attn-mlp, full, full-lin, unet-only, "
                                  "unet-transformer-only, unet-convblock-only, ia3, or a preset .toml file")
    dora: bool = opt(False, "weight-decomposed training (DoRA) on top of the algorithm")
    dora_axis: str = opt("out", "axis of the DoRA magnitude: out (LyCORIS/PEFT) or in (A1111/InvokeAI)",
                         choices=("out", "in"))
    mode: str = opt("auto", "training path per layer: auto (each algorithm's measured choice: DoRA, (IA)3, GLoRA, "
                            "BOFT, Full and LoKr rebuild W' and keep only x; the others add their delta to the "
                            "frozen output), bypass (always the delta path), rebuild (always op(x, W'))",
                    flag="network-mode", choices=("auto", "bypass", "rebuild"))
    train_unet: bool = opt(True, "put adapters on the UNet")
    train_text_encoder: bool = opt(True, "put adapters on the text encoder(s)")
    options: dict = opt(None, "algorithm options, e.g. {factor = 8, dropout = 0.1, use_tucker = true}; "
                              "on the command line KEY=VALUE, repeatable", factory=dict,
                        flag="network-option")
    overrides: list = opt(None, "per-pattern settings: [[network.overrides]] pattern = '*.attn2.*', "
                                "rank = 16, algo = 'lora' …; on the command line a JSON object, repeatable",
                          factory=list, flag="network-override")


@dataclass
class OptimizerConfig:
    """[optimizer] — optimiser and learning-rate schedule."""
    type: str = opt("adamw", "adamw (torch), adamw8bit (bitsandbytes), prodigy (prodigyopt)",
                    flag="optimizer", choices=OPTIMIZERS)
    learning_rate: float = opt(1e-4, "base learning rate", flag="lr")
    unet_lr: float | None = opt(None, "UNet learning rate (unset = learning_rate; 0 = do not train the UNet)")
    text_encoder_lr: float | None = opt(None, "text-encoder learning rate (unset = learning_rate; 0 = frozen)")
    loraplus_ratio: float | None = opt(None, "LoRA+: the 'up' factors learn this many times faster (e.g. 16)")
    weight_decay: float = opt(0.01, "decoupled weight decay")
    betas: list[float] = opt(None, "Adam betas", factory=lambda: [0.9, 0.999])
    eps: float = opt(1e-8, "Adam epsilon")
    args: dict = opt(None, "extra keyword arguments for the optimizer (e.g. {d_coef = 2} for prodigy)",
                     factory=dict, flag="optimizer-arg")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0 = no clipping)")
    flat: bool = opt(True, "adamw: keep each parameter group in one flat buffer and update it in one fused launch "
                           "(lyco.optim.FlatAdamW: torch AdamW's math, the same checkpoints; false = "
                           "torch.optim.AdamW per tensor; FSDP and extra args other than fused/capturable use torch's)",
                     flag="flat-adamw")
    lr_scheduler: str = opt("constant", "constant, constant_with_warmup, linear, cosine, cosine_with_restarts",
                            choices=LR_SCHEDULERS)
    lr_warmup_steps: float = opt(0, "linear warmup over this many optimizer steps (a value below 1 is a "
                                    "fraction of the run: 0.05 = the first 5%)")
    lr_scheduler_num_cycles: int = opt(1, "cosine_with_restarts: number of cycles")


@dataclass
class TrainConfig:
    """[train] — length, batching, objective."""
    max_train_steps: int = opt(0, "stop after this many optimizer steps (0 = use max_train_epochs)")
    max_train_epochs: int = opt(1, "epochs when max_train_steps is 0")
    batch_size: int = opt(1, "images per batch per process")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory)")
    cuda_graph: AutoBool = opt("auto", "capture the forward and backward pass of each batch shape as one CUDA graph "
                               "and replay it (removes the per-kernel launch cost that bounds small and mid-size "
                               "steps; the optimizer step stays eager). auto: on when the run is on a CUDA GPU, "
                               "off on the CPU and with module_dropout, DyLoRA or FSDP (which a graph cannot "
                               "replay); true: on, and those are errors; false: off (flag --no-cuda-graph). "
                               "Several processes then average gradients with one flat all-reduce")
    conv_weights_channels_last: AutoBool = opt(
        "auto", "keep the frozen U-Net's k×k conv weights channels-last where a weight has at least as many "
                "elements as its input at the first step — cuDNN then converts the smaller input rather than the "
                "weight on every call (H100, SD1.5 at 512 px, batch 1, as a CUDA graph: the frozen step 20.4 → 15.5 "
                "ms, LoRA 22.5 → 17.8; lyco.models.layout). auto: on a CUDA GPU with a bf16/fp16 model, not with "
                "FSDP; true: wherever the rule holds (not with FSDP); false: off. Only the weights' strides change")
    mixed_precision: str = opt("no", "no, fp16 or bf16 (base model in this dtype, adapter in fp32)",
                               choices=MIXED_PRECISION)
    autocast: bool = opt(True, "mixed precision under torch autocast (norms and softmax in fp32, with casts around "
                               "them); false (bf16 only): the bf16 model computes in bf16 as it is — the norms' "
                               "statistics still in fp32 inside their kernels — and the fp32 adapter is cast to bf16 "
                               "for its products: faster and smaller (H100, SD1.5-sized LoRA as a CUDA graph: 92.0 → "
                               "80.4 ms per step, 11.2 → 9.0 GiB; benchmarks/NOTES.md change 82); fp16 always needs "
                               "autocast (loss scaling)")
    seed: int = opt(42, "seed of everything: adapter init, data order, augmentation, noise")
    cpu: bool = opt(False, "train on the CPU even when a GPU is there (a resumed CPU run is bit-identical "
                           "to an uninterrupted one; GPU kernels need not be)")
    noise_offset: float = opt(0.0, "add offset·N(0,1) per channel to the noise (darker/brighter images)")
    min_snr_gamma: float = opt(0.0, "min-SNR-γ loss weighting (5 is common; 0 = off)")
    zero_terminal_snr: bool = opt(False, "rescale the noise schedule to zero terminal SNR "
                                         "(use with v_prediction)")
    min_timestep: int = opt(0, "smallest training timestep")
    max_timestep: int = opt(0, "largest training timestep + 1 (0 = the schedule's length)")


@dataclass
class OutputConfig:
    """[output] — files, checkpoints, logs."""
    output_dir: str = opt("out", "where everything is written", path=True)
    output_name: str = opt("adapter", "file name stem of the adapter (also ss_output_name, the A1111 alias)")
    save_dtype: str = opt("fp16", "dtype of saved adapters: fp32, fp16, bf16", choices=SAVE_DTYPES)
    save_every_n_steps: int = opt(0, "write a checkpoint every N optimizer steps (0 = off)")
    save_every_n_epochs: int = opt(0, "write a checkpoint every N epochs (0 = off)")
    save_state: bool = opt(True, "write a resumable training state next to every checkpoint")
    keep_last_n_checkpoints: int = opt(0, "delete older intermediate checkpoints and states (0 = keep all)")
    overwrite: bool = opt(False, "replace existing output files of the same name")
    log_with: str = opt("auto", "auto (TensorBoard when installed), tensorboard, none", choices=LOGGERS)
    logging_dir: str = opt("", "TensorBoard folder ('' = <output_dir>/logs)", path=True)
    progress_bar: bool = opt(True, "show a progress bar")
    metadata_title: str = opt("", "modelspec.title ('' = output_name)")
    metadata_author: str = opt("", "modelspec.author")
    metadata_description: str = opt("", "modelspec.description")
    metadata_license: str = opt("", "modelspec.license")
    metadata_tags: str = opt("", "modelspec.tags (comma-separated)")
    training_comment: str = opt("", "ss_training_comment")


@dataclass
class SampleConfig:
    """[sample] — sample grids written with each checkpoint."""
    prompts: list[str] = opt(None, "prompts (grid rows); on the command line repeat the flag",
                             factory=list, flag="sample-prompt")
    negative_prompt: str = opt("", "negative prompt")
    seeds: list[int] = opt(None, "seeds (grid columns)", factory=lambda: [0])
    steps: int = opt(20, "sampling steps")
    guidance_scale: float = opt(7.0, "classifier-free guidance scale")
    width: int = opt(0, "image width (0 = training resolution)")
    height: int = opt(0, "image height (0 = training resolution)")
    sampler: str = opt("default", "default (the model's), ddim, euler, euler_a, dpmpp_2m, pndm, ddpm",
                       choices=SAMPLERS)
    every_n_steps: int = opt(0, "also sample every N steps (0 = only with checkpoints)")
    at_start: bool = opt(False, "sample once before training")
    compare_base: bool = opt(False, "add a column per seed without the adapter")


@dataclass
class EvalConfig:
    """[eval] — loss on a fixed evaluation batch (fixed images, noise and timesteps)."""
    every_n_steps: int = opt(0, "compute the fixed-batch loss every N steps (0 = only at start and end)")
    num_images: int = opt(4, "images in the fixed batch (the first ones of the dataset)")
    timesteps: list[int] = opt(None, "timesteps each image is evaluated at",
                               factory=lambda: [100, 300, 500, 700, 900])
    seed: int = opt(1234, "seed of the fixed noise")
    enabled: bool = opt(True, "compute the fixed-batch loss at all", flag="eval")


STRATEGIES = ("ddp", "fsdp")
DDP_COMM = ("buckets", "flat")


@dataclass
class DistributedConfig:
    """[distributed] — several processes (``accelerate launch`` / ``torchrun``); ignored in one process."""
    strategy: str = opt("ddp", "ddp: every process holds the whole base model and the adapter gradients are "
                               "averaged; fsdp: the frozen base model and the adapter are sharded over the "
                               "processes (FSDP2, one unit per UNet block) — for bases that do not fit one card "
                               "comfortably (SDXL with Full, large batches). 'accelerate launch --use_fsdp' also "
                               "selects fsdp. Saved adapters and states are the same files either way",
                        choices=STRATEGIES)
    ddp_comm: str = opt("buckets", "ddp: how gradients are averaged — buckets (torch DDP: bucketed all-reduces "
                                   "overlapped with the backward pass) or flat (one all-reduce of every adapter "
                                   "gradient after the backward pass)", choices=DDP_COMM)
    ddp_static_graph: bool = opt(True, "ddp buckets: tell DDP the graph is the same every step (fewer "
                                       "per-step checks); off automatically with module_dropout or DyLoRA")
    ddp_bucket_mb: float = opt(25.0, "ddp buckets: gradient bucket size in MiB (torch's default 25)")
    fsdp_reshard_after_forward: bool = opt(True, "fsdp: free each block's gathered weights after its forward "
                                                 "and gather them again for backward (less memory, more "
                                                 "communication); false keeps them until the backward pass")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "network": NetworkConfig, "optimizer": OptimizerConfig,
    "train": TrainConfig, "output": OutputConfig, "sample": SampleConfig, "eval": EvalConfig,
    "distributed": DistributedConfig,
}
_FLAG_PREFIX = {"sample": "sample-", "eval": "eval-"}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    source: str | None = None  # the TOML file it was read from

    # -- conversions ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def flat_args(self) -> dict[str, Any]:
        """``{section.key: value}`` of every option (for ``ss_training_args``-like metadata)."""
        return {f"{s}.{k}": v for s, d in self.to_dict().items() for k, v in d.items()}

    def replace(self, **sections: Mapping[str, Any]) -> "Config":
        """A copy with some keys changed: ``cfg.replace(train={"max_train_steps": 10})`` (validated)."""
        d = self.to_dict()
        for s, vals in sections.items():
            if s not in SECTIONS:
                raise ConfigError(f"unknown config table [{s}]{_suggest(s, SECTIONS)}")
            d[s].update(vals)
        return from_dict(d, base_dir=None, source=self.source)

    @property
    def resolution(self) -> tuple[int, int]:
        r = self.data.resolution
        return (r[0], r[0]) if len(r) == 1 else (r[0], r[1])

    @property
    def cache_dir(self) -> str:
        return self.data.cache_dir or os.path.join(self.output.output_dir, "cache")

    @property
    def logging_dir(self) -> str:
        return self.output.logging_dir or os.path.join(self.output.output_dir, "logs")


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _suggest(key: str, known) -> str:
    m = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {m[0]!r}?)" if m else ""


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(where: str, value: Any, tp) -> Any:
    """Strictly check/coerce one value against an annotation (int, float, str, bool, X | None,
    list[...], dict)."""
    if tp == AutoBool:
        if isinstance(value, bool):
            return value
        low = value.strip().lower() if isinstance(value, str) else None
        if low in ("auto", "true", "false"):
            return "auto" if low == "auto" else low == "true"
        raise ConfigError(f'{where}: expected "auto", true or false, got {value!r}')
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(where, value, inner[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
            if not math.isfinite(v):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return v
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args:
            return [_check_value(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value)]
        return list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    return value


def _section_from(name: str, cls, raw: Mapping[str, Any], base_dir: str | None):
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{name}] must be a table, got {raw!r}")
    hints = _hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            owner = [n for n, c in SECTIONS.items() if n != name and key in {f.name for f in fields(c)}]
            hint = f" (it belongs in the [{owner[0]}] table)" if owner else _suggest(key, known)
            raise ConfigError(f"[{name}] unknown key {key!r}{hint}; accepted: {', '.join(known)}")
        f = known[key]
        if key == "resolution" and isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        where = f"[{name}] {key}"
        v = _check_value(where, value, hints[key])
        ch = f.metadata.get("choices")
        if ch and v not in ch:
            raise ConfigError(f"{where}: {v!r} is not one of {', '.join(repr(c) for c in ch)}")
        if f.metadata.get("path") and v and base_dir and not _is_special_path(v):
            v = os.path.normpath(os.path.join(base_dir, os.path.expanduser(v)))
        elif f.metadata.get("path") and v and not _is_special_path(v):
            v = os.path.expanduser(v)
        kwargs[key] = v
    return cls(**kwargs)


def _is_special_path(v: str) -> bool:
    return v.startswith("tiny:") or os.path.isabs(v)


def from_dict(d: Mapping[str, Any], base_dir: str | None = None, source: str | None = None) -> Config:
    """Build and validate a :class:`Config` from nested dicts (the TOML structure)."""
    if not isinstance(d, Mapping):
        raise ConfigError("the configuration must be a table of tables")
    for s in d:
        if s not in SECTIONS:
            hint = _suggest(s, SECTIONS)
            owner = [n for n, c in SECTIONS.items() if s in {f.name for f in fields(c)}]
            if owner:
                hint = f" (it belongs in the [{owner[0]}] table)"
            raise ConfigError(f"unknown config table or key {s!r}{hint}; tables: "
                              f"{', '.join('[' + n + ']' for n in SECTIONS)}")
    cfg = Config(**{s: _section_from(s, cls, d.get(s, {}), base_dir) for s, cls in SECTIONS.items()},
                 source=source)
    validate(cfg)
    return cfg


def load(path: str | os.PathLike | None, flags: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """Read a TOML file (or nothing: all defaults) and apply flag values ``{section: {key: value}}``."""
    import tomllib
    data: dict[str, Any] = {}
    base_dir = None
    source = None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text: {e}") from None
        base_dir = str(p.resolve().parent)
        source = str(p)
    cfg = from_dict(data, base_dir=base_dir, source=source)
    if flags:
        cfg = cfg.replace(**{s: dict(v) for s, v in flags.items()})
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field and range checks (types and choices were checked while reading)."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    d, n, o, t, out, s, e = cfg.data, cfg.network, cfg.optimizer, cfg.train, cfg.output, cfg.sample, cfg.eval
    need(cfg.model.clip_skip >= 1, f"[model] clip_skip must be >= 1, got {cfg.model.clip_skip}")
    need(len(d.resolution) in (1, 2) and all(r >= 8 for r in d.resolution),
         f"[data] resolution must be one or two integers >= 8, got {d.resolution}")
    need(d.bucket_reso_steps >= 8 and d.bucket_reso_steps % 8 == 0,
         f"[data] bucket_reso_steps must be a positive multiple of 8, got {d.bucket_reso_steps}")
    need(all(r % 8 == 0 for r in d.resolution),
         f"[data] resolution sides must be multiples of 8, got {d.resolution}")
    need(0 < d.min_bucket_reso <= d.max_bucket_reso,
         f"[data] need 0 < min_bucket_reso <= max_bucket_reso, got {d.min_bucket_reso}, {d.max_bucket_reso}")
    for k in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        v = getattr(d, k)
        need(0.0 <= v <= 1.0, f"[data] {k} must be within [0, 1], got {v}")
    need(d.keep_tokens >= 0, f"[data] keep_tokens must be >= 0, got {d.keep_tokens}")
    need(d.repeats >= 1, f"[data] repeats must be >= 1, got {d.repeats}")
    need(d.prior_loss_weight >= 0, f"[data] prior_loss_weight must be >= 0, got {d.prior_loss_weight}")
    need(d.caption_separator != "", "[data] caption_separator must not be empty")
    need(d.num_workers >= 0, f"[data] num_workers must be >= 0, got {d.num_workers}")
    need(n.rank >= 1, f"[network] rank must be >= 1, got {n.rank}")
    need(n.conv_rank is None or n.conv_rank >= 1, f"[network] conv_rank must be >= 1, got {n.conv_rank}")
    need(n.train_unet or n.train_text_encoder,
         "[network] train_unet and train_text_encoder are both false: nothing to train")
    for i, ov in enumerate(n.overrides):
        need(isinstance(ov, Mapping), f"[[network.overrides]] #{i}: expected a table, got {ov!r}")
        need("pattern" in ov or "module_class" in ov,
             f"[[network.overrides]] #{i}: needs a 'pattern' (glob or 're:<regex>') or 'module_class'")
    need(o.learning_rate > 0 or o.type == "prodigy",
         f"[optimizer] learning_rate must be > 0, got {o.learning_rate}")
    for k in ("unet_lr", "text_encoder_lr"):
        v = getattr(o, k)
        need(v is None or v >= 0, f"[optimizer] {k} must be >= 0, got {v}")
    need(o.loraplus_ratio is None or o.loraplus_ratio > 0,
         f"[optimizer] loraplus_ratio must be > 0, got {o.loraplus_ratio}")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
         f"[optimizer] betas must be two numbers in [0, 1), got {o.betas}")
    need(o.max_grad_norm >= 0, f"[optimizer] max_grad_norm must be >= 0, got {o.max_grad_norm}")
    need(o.lr_warmup_steps >= 0, f"[optimizer] lr_warmup_steps must be >= 0, got {o.lr_warmup_steps}")
    need(o.lr_scheduler_num_cycles >= 1, "[optimizer] lr_scheduler_num_cycles must be >= 1")
    need(t.max_train_steps >= 0, f"[train] max_train_steps must be >= 0, got {t.max_train_steps}")
    need(t.max_train_steps > 0 or t.max_train_epochs >= 1,
         "[train] set max_train_steps > 0 or max_train_epochs >= 1")
    need(t.batch_size >= 1, f"[train] batch_size must be >= 1, got {t.batch_size}")
    need(t.gradient_accumulation_steps >= 1,
         f"[train] gradient_accumulation_steps must be >= 1, got {t.gradient_accumulation_steps}")
    need(t.noise_offset >= 0, f"[train] noise_offset must be >= 0, got {t.noise_offset}")
    need(t.min_snr_gamma >= 0, f"[train] min_snr_gamma must be >= 0, got {t.min_snr_gamma}")
    need(t.min_timestep >= 0, f"[train] min_timestep must be >= 0, got {t.min_timestep}")
    need(t.max_timestep == 0 or t.max_timestep > t.min_timestep,
         f"[train] max_timestep ({t.max_timestep}) must be > min_timestep ({t.min_timestep}) or 0")
    need(out.output_name and "/" not in out.output_name and "\\" not in out.output_name,
         f"[output] output_name must be a plain file name stem, got {out.output_name!r}")
    for k in ("save_every_n_steps", "save_every_n_epochs", "keep_last_n_checkpoints"):
        need(getattr(out, k) >= 0, f"[output] {k} must be >= 0")
    need(s.steps >= 1, f"[sample] steps must be >= 1, got {s.steps}")
    need(len(s.seeds) >= 1, "[sample] seeds must list at least one seed")
    need(s.width >= 0 and s.height >= 0 and s.width % 8 == 0 and s.height % 8 == 0,
         "[sample] width/height must be multiples of 8 (0 = training resolution)")
    need(s.every_n_steps >= 0, "[sample] every_n_steps must be >= 0")
    need(e.num_images >= 1, "[eval] num_images must be >= 1")
    need(len(e.timesteps) >= 1 and all(ts >= 0 for ts in e.timesteps),
         "[eval] timesteps must list at least one timestep >= 0")
    need(e.every_n_steps >= 0, "[eval] every_n_steps must be >= 0")
    need(cfg.distributed.ddp_bucket_mb > 0,
         f"[distributed] ddp_bucket_mb must be > 0, got {cfg.distributed.ddp_bucket_mb}")
    need(not (cfg.distributed.strategy == "fsdp" and o.type == "prodigy"),
         "[distributed] strategy = 'fsdp' with [optimizer] type = 'prodigy' is not supported (Prodigy sums over "
         "all parameters; under FSDP each process holds a shard); use adamw or adamw8bit")
    if t.cuda_graph is True:  # "auto" turns itself off instead (resolve_cuda_graph)
        for _, msg in cuda_graph_blockers(cfg):
            raise ConfigError(msg)
    need(t.autocast or t.mixed_precision == "bf16",
         "[train] autocast = false needs mixed_precision = 'bf16' (fp16 trains with autocast and loss scaling; "
         "without mixed precision there is no autocast to turn off)")
    need(not (cfg.distributed.strategy == "fsdp" and t.mixed_precision == "fp16"),
         "[distributed] strategy = 'fsdp' with [train] mixed_precision = 'fp16' is not supported (fp16 loss "
         "scaling of sharded gradients); use bf16")


def _module_dropout_tables(n: NetworkConfig) -> list[Mapping]:
    """``[network] options`` and every override (its own keys and its ``options`` table): where a
    module_dropout can be set in the config (a preset file's overrides are checked on the built network)."""
    ovs = [ov for ov in n.overrides if isinstance(ov, Mapping)]
    return [n.options or {}, *ovs, *(ov["options"] for ov in ovs if isinstance(ov.get("options"), Mapping))]


def _positive(v) -> bool:
    try:
        return float(v or 0) > 0
    except (TypeError, ValueError):  # not a number: the algorithm's option check reports it
        return False


def cuda_graph_blockers(cfg: Config) -> list[tuple[str, str]]:
    """What in this config a CUDA graph cannot replay, as ``(short reason, error message)`` pairs (none: a
    graph can apply, device permitting). A graph replays the kernels it recorded, so a decision the host
    makes every step (which module to drop, which DyLoRA rank block to train, FSDP's gathers) would be
    frozen at its captured value. ``cuda_graph = true`` makes the first one an error; ``"auto"`` turns
    graphs off and names it."""
    t, n = cfg.train, cfg.network
    out = []
    if t.cpu:
        out.append(("[train] cpu = true", "[train] cuda_graph = true needs a GPU, but [train] cpu = true"))
    if cfg.distributed.strategy == "fsdp":
        out.append(("[distributed] strategy = 'fsdp'",
                    "[train] cuda_graph = true with [distributed] strategy = 'fsdp' is not supported (FSDP gathers "
                    "and frees weights with host-side bookkeeping every step); use strategy = 'ddp'"))
    if any(_positive(tb.get("module_dropout")) for tb in _module_dropout_tables(n)):
        out.append(("[network] module_dropout > 0",
                    "[train] cuda_graph = true with [network] options module_dropout > 0 is not supported (the "
                    "module to drop is chosen on the host every step; a CUDA graph would replay one choice "
                    "forever); use dropout or rank_dropout, or cuda_graph = false"))
    if n.algo == "dylora" or any(isinstance(ov, Mapping) and ov.get("algo") == "dylora" for ov in n.overrides):
        out.append(("[network] algo = 'dylora'",
                    "[train] cuda_graph = true with [network] algo = 'dylora' is not supported (the trained rank "
                    "block is drawn on the host every step); use cuda_graph = false"))
    return out


def resolve_cuda_graph(cfg: Config, device_type: str) -> tuple[bool, str]:
    """Whether a run on a ``device_type`` device (``"cuda"``, ``"cpu"``, …) replays its steps as CUDA graphs,
    and why: ``(on, reason)``, the reason as the trainer logs it (``"auto"``, ``"auto: [train] cpu = true"``,
    ``"[train] cuda_graph = false"``…).

    ``"auto"`` (the default) is on only on a CUDA device with none of :func:`cuda_graph_blockers`: measured
    on an H200 (``benchmarks/results/train_graph_h200_run2``), the real trainer on SD1.5, batch 8, LoRA, takes
    108.0 ms a step with graphs vs 158.7 eager (1.47x) for 11.48 vs 11.39 GiB peak, with the same adapters
    within noise, and a step that cannot be captured falls back to eager with one warning
    (:mod:`lyco.train.graphs`). ``true`` is on (:func:`validate` refused the blockers; the trainer refuses a
    device that is not CUDA); ``false`` is off."""
    v = cfg.train.cuda_graph
    if v is True or v is False:
        return v, f"[train] cuda_graph = {'true' if v else 'false'}"
    if cfg.train.cpu:
        return False, "auto: [train] cpu = true"
    if device_type != "cuda":
        return False, f"auto: the run is on {device_type}, not a CUDA GPU"
    blockers = cuda_graph_blockers(cfg)
    if blockers:
        return False, f"auto: {blockers[0][0]}"
    return True, "auto"


def check_runnable(cfg: Config) -> None:
    """What a run (not just a valid file) needs: a model and a dataset."""
    if not cfg.model.path:
        raise ConfigError("no base model: set [model] path (or --model)")
    if not cfg.data.train_dir:
        raise ConfigError("no training images: set [data] train_dir (or --train-dir)")


# --------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------


def flag_of(section: str, f: dataclasses.Field) -> str:
    explicit = f.metadata.get("flag")
    if explicit:
        return explicit
    pre = _FLAG_PREFIX.get(section, "")
    name = f.name.replace("_", "-")
    return name if name.startswith(pre) else pre + name


def _all_flags() -> dict[str, tuple[str, dataclasses.Field]]:
    out: dict[str, tuple[str, dataclasses.Field]] = {}
    for s, cls in SECTIONS.items():
        for f in fields(cls):
            fl = flag_of(s, f)
            if fl in out:
                raise AssertionError(f"duplicate flag --{fl} ([{out[fl][0]}] and [{s}])")
            out[fl] = (s, f)
    return out


FLAGS = _all_flags()


def _kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), _scalar(v.strip())


def _scalar(v: str) -> Any:
    """A flag value as TOML would read it: true/false, integers, floats, else the string."""
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def _json_table(text: str) -> dict:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return v


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config key (defaults are ``None`` = "not given": the file/defaults stay)."""
    hints_cache: dict[type, dict] = {}
    for s, cls in SECTIONS.items():
        group = parser.add_argument_group(f"[{s}]", (cls.__doc__ or "").split("—", 1)[-1].strip())
        hints = hints_cache.setdefault(cls, _hints(cls))
        for f in fields(cls):
            fl = flag_of(s, f)
            tp = hints[f.name]
            inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
                typing.Union, getattr(__import__("types"), "UnionType", None)) else [tp]
            base = inner[0] if inner else tp
            dest = f"cfg__{s}__{f.name}"
            h = f.metadata.get("help", "")
            ch = f.metadata.get("choices")
            kw: dict[str, Any] = {"dest": dest, "default": None}
            if base is bool or tp == AutoBool:  # an AutoBool's "auto" is its default (no flag sets it)
                spec = {"action": argparse.BooleanOptionalAction}
            elif base is dict:
                spec = {"action": "append", "type": _kv, "metavar": "KEY=VALUE"}
            elif typing.get_origin(base) is list or base is list:
                args = typing.get_args(base)
                if s == "network" and f.name == "overrides":
                    spec = {"action": "append", "type": _json_table, "metavar": "JSON"}
                elif args and args[0] is str:
                    spec = {"action": "append", "metavar": "TEXT"}
                else:
                    conv = args[0] if args else str
                    spec = {"nargs": "+", "type": conv, "metavar": _type_name(conv).upper()}
            else:
                conv = {int: int, float: float, str: str}.get(base, str)
                spec = {"type": conv, "metavar": _type_name(conv).upper()}
                if ch:
                    spec["choices"] = list(ch)
            # argparse %-formats help texts (for %(default)s): a literal % in a declaration must be doubled
            group.add_argument(f"--{fl}", help=h.replace("%", "%%"), **kw, **spec)
            if "-" in fl:  # kohya-style spelling, hidden from --help
                group.add_argument(f"--{fl.replace('-', '_')}", help=argparse.SUPPRESS, **kw, **spec)


def normalise_argv(argv: list[str]) -> list[str]:
    """Accept kohya-style underscores in flag names: ``--learning_rate`` → ``--learning-rate``."""
    out = []
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name, eq, rest = a[2:].partition("=")
            out.append("--" + name.replace("_", "-") + eq + rest)
        else:
            out.append(a)
    return out


def flags_from_args(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The values of the config flags that were given: ``{section: {key: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for dest, value in vars(ns).items():
        if not dest.startswith("cfg__") or value is None:
            continue
        _, s, k = dest.split("__", 2)
        if k == "options" or k == "args":
            value = dict(value)
        if s == "model" and k == "path" or (SECTIONS[s].__dataclass_fields__[k].metadata.get("path")):
            if isinstance(value, str) and value and not _is_special_path(value):
                value = os.path.abspath(os.path.expanduser(value))
        out.setdefault(s, {})[k] = value
    return out


# --------------------------------------------------------------------------------------
# The commented example
# --------------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


def commented_toml(cfg: Config | None = None) -> str:
    """Every option with its help text and value (defaults, or ``cfg``'s), as a TOML document."""
    cfg = cfg or Config()
    lines = ["# lyco train configuration — every option.",
             "# Relative paths are relative to this file. Every key is also a command-line flag",
             "# (shown as 'flag:'), and flags override the file.", ""]
    for s, cls in SECTIONS.items():
        sec = getattr(cfg, s)
        lines.append(f"# {cls.__doc__.strip()}")
        lines.append(f"[{s}]")
        for f in fields(cls):
            if s == "network" and f.name == "overrides":
                continue
            v = getattr(sec, f.name)
            lines.append(f"# {f.metadata['help']}  (flag: --{flag_of(s, f)})")
            if v is None:
                lines.append(f"# {f.name} =")
            else:
                lines.append(f"{f.name} = {_toml_value(v)}")
        lines.append("")
        if s == "network":
            lines.append("# Per-pattern overrides (later ones win); keys: pattern or module_class, component, "
                         "algo, rank, alpha, options…")
            if cfg.network.overrides:
                for ov in cfg.network.overrides:
                    lines.append("[[network.overrides]]")
                    lines += [f"{k} = {_toml_value(v)}" for k, v in ov.items()]
            else:
                lines += ["# [[network.overrides]]", "# pattern = \"*.attn2.*\"", "# rank = 16"]
            lines.append("")
    return "\n".join(lines)

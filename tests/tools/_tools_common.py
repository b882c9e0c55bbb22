"""Shared fixtures of the tool tests: tiny SD1/SDXL pipelines, their checkpoints (single file and
diffusers folder), adapter files of every algorithm with random non-zero tensors, and reference
forwards. One torch thread: the tests share 2 cores with others."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import lyco
from lyco.adapter import Adapter, ModuleAdapter
from lyco.models import tiny

torch.set_num_threads(1)

FAMILIES = ("sd1", "sdxl")

# every algorithm (with options that exercise it) and a preset it fits on the tiny models
ALGOS = {
    "lora": (dict(algo="lora", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0), "full"),
    "locon-tucker": (dict(algo="lora", rank=3, alpha=2.0, conv_rank=3, use_tucker=True), "unet-convblock-only"),
    "lora-dora": (dict(algo="lora", rank=3, alpha=2.0, dora=True), "attn-mlp"),
    "loha": (dict(algo="loha", rank=2, alpha=1.0), "attn-mlp"),
    "loha-conv": (dict(algo="loha", rank=2, alpha=1.0, conv_rank=2), "unet-convblock-only"),
    "loha-dora": (dict(algo="loha", rank=2, alpha=1.0, dora=True), "attn-only"),
    "lokr": (dict(algo="lokr", rank=2, alpha=1.0, factor=4), "full"),
    "lokr-full": (dict(algo="lokr", rank=2, factor=2, full_matrix=True), "attn-only"),
    "ia3": (dict(algo="ia3"), "ia3"),
    "glora": (dict(algo="glora", rank=2, alpha=1.0), "attn-only"),
    "full": (dict(algo="full"), "attn-only"),
    "diag-oft": (dict(algo="diag-oft", rank=4, constraint=0.0), "attn-only"),
    "boft": (dict(algo="boft", rank=2), "attn-only"),
}


def randomise(net, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.layers.values():
            for name, p in layer.params.items():
                r = torch.randn(p.shape, generator=g, dtype=torch.float32)
                if name == "dora_scale":
                    r = p * (1.0 + 0.2 * r.abs())
                elif name.startswith("oft_blocks"):
                    r = r * 0.1
                else:
                    r = r * scale
                p.copy_(r.to(p.dtype))


def make_adapter(pipe, key: str, seed: int = 0) -> Adapter:
    """An adapter of algorithm ``key`` (see ALGOS) on ``pipe`` with random non-zero tensors."""
    cfg, preset = ALGOS[key]
    net = lyco.create(pipe, preset=preset, seed=seed, **cfg)
    randomise(net, seed + 1, 0.05 if key == "full" else 0.1 if key.startswith(("lokr", "loha")) else 0.3)
    a = net.to_adapter()
    net.detach()
    return a


def norm_adapter(pipe, family: str, seed=0) -> Adapter:
    """Norm (w_norm/b_norm) modules on every GroupNorm/LayerNorm of the UNet's first block."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for n, m in pipe.unet.named_modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and n.startswith("down_blocks.1"):
            c = m.weight.shape[0]
            mods[f"unet.{n}"] = ModuleAdapter("norm", {"w_norm": torch.randn(c, generator=g) * 0.1,
                                                       "b_norm": torch.randn(c, generator=g) * 0.1})
    return Adapter(mods, {}, family)


def sha(path) -> str:
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def pipes():
    """Tiny pipelines in float64: comparisons of merged and attached models are then exact to
    ~1e-12 instead of sitting at fp32's rounding amplified through the network."""
    return {f: tiny.tiny_pipeline(f, seed=0, dtype=torch.float64) for f in FAMILIES}


@pytest.fixture(scope="session")
def ckpts(pipes, tmp_path_factory):
    """{family: {"single": path, "folder": path}} of the tiny models (fp64)."""
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for f in FAMILIES:
        out[f] = {"single": tiny.save_tiny_single_file(pipes[f], d / f"{f}.safetensors"),
                  "folder": tiny.save_tiny(pipes[f], d / f"{f}_diffusers")}
    return out


class _AdapterFiles(dict):
    """(family, algo key) → path of a saved adapter with random tensors, made on first use."""

    def __init__(self, pipes, folder):
        super().__init__()
        self.pipes, self.folder = pipes, folder

    def __missing__(self, key):
        family, algo = key
        p = self.folder / f"{family}_{algo}.safetensors"
        seed = 10 + (list(ALGOS).index(algo) if algo in ALGOS else 99) + (100 if family == "sdxl" else 0)
        a = norm_adapter(self.pipes[family], family, seed) if algo == "norm" else \
            make_adapter(self.pipes[family], algo, seed=seed)
        a.save(p, dtype="fp32")
        self[key] = p
        return p


@pytest.fixture(scope="session")
def algo_files(pipes, tmp_path_factory):
    """{(family, algo key): path} of saved adapters, made on first use."""
    return _AdapterFiles(pipes, tmp_path_factory.mktemp("adapters"))


# --- reference forwards ---------------------------------------------------------------------

def inputs(family: str, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    ctx = 64 if family == "sdxl" else 32
    x = {"sample": torch.randn(1, 4, 8, 8, generator=g, dtype=dtype), "timestep": torch.tensor(17),
         "encoder_hidden_states": torch.randn(1, 77, ctx, generator=g, dtype=dtype)}
    if family == "sdxl":
        x["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g, dtype=dtype),
                                  "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]], dtype=dtype)}
    ids = torch.randint(0, 250, (1, 77), generator=g)
    return x, ids


@torch.no_grad()
def forwards(pipe, family: str) -> dict[str, torch.Tensor]:
    """UNet output and every text encoder's outputs on fixed inputs."""
    x, ids = inputs(family, dtype=pipe.unet.dtype)
    out = {"unet": pipe.unet(**x).sample}
    out["te"] = pipe.text_encoder(ids)[0]
    if family == "sdxl":
        o = pipe.text_encoder_2(ids)
        out["te2"] = o.last_hidden_state
        out["te2_proj"] = o.text_embeds
    return out


def assert_outputs_close(a: dict, b: dict, rel: float = 1e-9):
    for k in a:
        scale = float(a[k].abs().max())
        diff = float((a[k] - b[k]).abs().max())
        assert diff <= rel * max(scale, 1.0), f"{k}: max |Δ| {diff:.3g} (scale {scale:.3g})"


def assert_outputs_differ(a: dict, b: dict, keys, rel: float = 1e-3):
    for k in keys:
        scale = float(a[k].abs().max())
        diff = float((a[k] - b[k]).abs().max())
        assert diff > rel * scale, f"{k}: the adapters do not change the output ({diff:.3g})"

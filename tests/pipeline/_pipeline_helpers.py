"""Helpers for the pipeline tests: tiny SD pipelines, random adapter files, snapshots
(imported by the tests as ``from _pipeline_helpers import …``; fixtures are in conftest.py)."""

from __future__ import annotations

import copy

import torch

import lyco

torch.set_num_threads(1)

# every algorithm, with options that exercise it (created with lyco.create, then randomised)
ALGOS = {
    "lora": dict(algo="lora", rank=3, alpha=2.0),
    "locon-tucker": dict(algo="lora", rank=3, alpha=2.0, use_tucker=True),
    "loha": dict(algo="loha", rank=2, alpha=1.0),
    "lokr": dict(algo="lokr", rank=2, alpha=1.0, factor=2),
    "dora-lora": dict(algo="lora", rank=3, alpha=2.0, dora=True),
    "ia3": dict(algo="ia3"),
    "glora": dict(algo="glora", rank=2, alpha=1.0),
    "full": dict(algo="full"),
    "diag-oft": dict(algo="diag-oft", rank=4, constraint=0.0),
    "boft": dict(algo="boft", rank=2),
}

#: a cheaper target set than "full" that still has every kind of layer: k×k and 1×1 convs (resnets,
#: proj_in/out, a downsampler, an upsampler), attention and MLP Linears, text-encoder layers
PRESET_SOME = {"unet": {"target_names": ["down_blocks.1", "mid_block", "up_blocks.2"]},
               "text_encoder": {"target_names": ["text_model.encoder.layers.1"]}, "include_conv": True}

#: a small target set for tests that attach/detach many times (and for BOFT, whose shape check on
#: the meta device is slow): one down block (convs, attention, downsampler) and one text layer
PRESET_FEW = {"unet": {"target_names": ["down_blocks.1"]},
              "text_encoder": {"target_names": ["text_model.encoder.layers.1"]}, "include_conv": True}

_BASES: dict = {}


def base_pipe(family: str = "sd1", dtype: torch.dtype = torch.float32):
    """A fresh copy of the tiny pipeline of ``family`` (built once per session, then deep-copied)."""
    key = (family, dtype)
    if key not in _BASES:
        from lyco.models.tiny import tiny_pipeline
        p = tiny_pipeline(family, seed=0, dtype=dtype)
        p.set_progress_bar_config(disable=True)
        _BASES[key] = p
    p = copy.deepcopy(_BASES[key])
    p.set_progress_bar_config(disable=True)
    return p


def randomise(net, seed: int = 0, scale: float = 0.3) -> None:
    """Random non-zero adapter tensors (so every adapter visibly changes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.layers.values():
            for name, p in layer.params.items():
                r = torch.randn(p.shape, generator=g, dtype=torch.float32)
                if name == "dora_scale":
                    p.mul_((1 + 0.2 * r).to(p.dtype))
                elif name.startswith("oft_blocks"):
                    p.copy_((0.1 * r).to(p.dtype))
                elif name.startswith("hada_") or name.startswith("lokr_"):
                    p.copy_((0.5 * r).to(p.dtype))
                else:
                    p.copy_((scale * r).to(p.dtype))


def make_adapter_file(pipe, path, cfg=None, *, seed=0, preset="full", metadata=None, **kw):
    """Create a random adapter of ``cfg`` on ``pipe``, save it to ``path``, detach it again."""
    cfg = dict(cfg or ALGOS["lora"])
    cfg.update(kw)
    net = lyco.create(pipe, preset=preset, seed=seed, **cfg)
    randomise(net, seed)
    net.save(str(path), metadata=metadata)
    net.detach()
    return path


def snapshot(pipe) -> dict:
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, comp, None)
        if m is not None:
            out.update({f"{comp}.{k}": v.detach().clone() for k, v in m.state_dict().items()})
    return out


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def run(pipe, prompt="a photo of a cat", seed=0, steps=2, size=32, output_type="latent", **kw):
    """A short, seeded generation; latents by default (more sensitive than 8-bit images)."""
    with torch.inference_mode():
        return pipe(prompt, num_inference_steps=steps, height=size, width=size, output_type=output_type,
                    generator=torch.Generator().manual_seed(seed), **kw).images


def assert_close(a, b, tol, what=""):
    d = (a.float() - b.float()).abs().max().item()
    assert d <= tol, f"{what}: max |Δ| = {d:.3g} > {tol:.3g}"


def differ(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()

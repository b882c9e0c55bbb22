"""``lyco generate`` and ``lyco grid``: images from a base model with adapters, A1111-style.

Both are thin: they parse arguments, load the base model once (:func:`lyco.pipeline.load_base`)
and call :func:`lyco.pipeline.generate` / :func:`lyco.pipeline.grid`. The PNG is written
atomically with the generation parameters in its ``parameters`` text chunk (A1111 infotext).
"""

from __future__ import annotations

import os
import sys

from .cli import command
from .errors import ConfigError, LycoError


def _size(text: str | None):
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must look like 512x768 (width x height), got {text!r}") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise ConfigError(f"--size {text}: width and height must be positive multiples of 8")
    return w, h


def _adapter_arg(text: str) -> tuple[str, float]:
    """``FILE[:W]``; a trailing ``:number`` is the weight (so ``C:\\x.safetensors`` still works)."""
    path, sep, w = text.rpartition(":")
    if sep and path:
        try:
            return path, float(w)
        except ValueError:
            pass
    return text, 1.0


def _device_dtype(device: str, dtype: str):
    import torch

    from .formats.kohya import parse_dtype
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LycoError(f"--device {device}: CUDA is not available on this machine")
    if dtype == "auto":
        dt = torch.float16 if device.startswith("cuda") else torch.float32
    else:
        dt = parse_dtype(dtype)
    return device, dt


def _common(p, grid: bool = False) -> None:
    p.add_argument("--model", required=True, metavar="BASE",
                   help="base model: a diffusers folder, a single-file .safetensors/.ckpt checkpoint, "
                        "or a built-in tiny model (tiny:sd1, tiny:sd2, tiny:sdxl)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="folder searched (recursively) for the files <lora:NAME:…> tags name, by file stem "
                        "or ss_output_name; repeatable, first match wins")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--size", metavar="WxH", help="image size (default: the model's native size)")
    p.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (default 7)")
    p.add_argument("-o", "--output", required=True, metavar="PNG", help="output image")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="weights and activations (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--allow-unmatched", action="store_true",
                   help="skip adapter modules the model does not have (warning) instead of failing")
    p.add_argument("--tokenizer", metavar="DIR", help="CLIP tokenizer folder (single-file checkpoints carry none)")
    p.add_argument("--tokenizer-2", metavar="DIR", help="second tokenizer folder (SDXL single files)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load(a):
    from .pipeline import load_base
    device, dtype = _device_dtype(a.device, a.dtype)
    if not a.overwrite and os.path.lexists(a.output):
        raise LycoError(f"{a.output}: already exists; pass --overwrite to replace it")
    return load_base(a.model, device=device, dtype=dtype, tokenizer=a.tokenizer, tokenizer_2=a.tokenizer_2)


@command("generate", "generate an image with adapters named in the prompt (<lora:NAME:TE[:UNET[:DYN]]>) or "
         "given with --adapter; writes A1111-style parameters into the PNG",
         'lyco generate --model sd15.safetensors --prompt "a castle <lora:watercolor:0.8>" \\\n'
         "      --adapter-dir loras/ --seed 42 --steps 25 --size 512x512 -o castle.png\n"
         '  lyco generate --model tiny:sd1 --prompt "a cat" --adapter my_lora.safetensors:0.7 -o cat.png')
def _generate():
    def add(p):
        p.add_argument("--prompt", required=True, help="prompt; adapter tags <lora:…>/<lyco:…> are applied and removed")
        p.add_argument("--adapter", action="append", default=[], metavar="FILE[:W]",
                       help="an adapter applied at weight W (UNet and text encoder, default 1) whatever the "
                            "prompt says; repeatable")
        p.add_argument("--seed", type=int, default=-1, help="seed (default -1: a random one, recorded in the PNG)")
        p.add_argument("--fuse", action="store_true", help="bake the adapters into the weights for the run "
                       "(faster sampling; the weights are restored exactly afterwards)")
        _common(p)

    def run(a):
        from . import pipeline as lp
        from .prompt import AdapterTag
        size = _size(a.size)
        for path, _w in map(_adapter_arg, a.adapter):
            if not os.path.isfile(path):
                raise LycoError(f"--adapter {path}: no such file")
        pipe, model_name, model_hash = _load(a)
        reg = lp.adapters(pipe)
        recorded = a.prompt
        for path, w in map(_adapter_arg, a.adapter):
            e = reg.load(path, w, name=reg._free_name(os.path.splitext(os.path.basename(path))[0]),
                         strict=not a.allow_unmatched)
            # recorded as a tag, so pasting the parameters into A1111 reproduces the image
            tag_name = e.alias if e.alias and not any(c in e.alias for c in ":<>") else e.name
            recorded += " " + AdapterTag("lora", tag_name, w, w).as_tag()
        out = lp.generate(pipe, a.prompt, negative=a.negative, adapter_dirs=a.adapter_dir, seed=a.seed,
                          steps=a.steps, size=size, guidance=a.guidance, fuse=a.fuse,
                          progress=not a.no_progress, strict=not a.allow_unmatched,
                          model_name=model_name, model_hash=model_hash)
        text = out.infotext
        if recorded != a.prompt:
            text = recorded + text[len(a.prompt):]
        lp.save_png(out.image, a.output, text, overwrite=a.overwrite)
        print(f"wrote {a.output} ({out.image.width}x{out.image.height}, seed {out.seed})")
        active = reg.active()
        if active:
            print("adapters: " + ", ".join(f"{e.name} (unet {e.unet:g}, te {e.te:g})" for e in active))
        return 0
    return add, run


@command("grid", "an X/Y grid of one adapter's weights (or two adapters against each other) over prompts "
         "and seeds: one labelled PNG, the base model loaded once",
         "lyco grid --model sd15.safetensors --adapter style.safetensors --weights 0,0.25,0.5,0.75,1 \\\n"
         '      --prompts "a castle" "a portrait" --seeds 1 2 -o grid.png\n'
         "  lyco grid --model tiny:sd1 --adapter a.safetensors --weights 0,0.5,1 \\\n"
         '      --adapter2 b.safetensors --weights2 0,1 --prompts "a cat" --seeds 7 -o ab.png')
def _grid():
    def add(p):
        p.add_argument("--adapter", required=True, metavar="FILE", help="adapter whose weight varies along x")
        p.add_argument("--weights", required=True, metavar="W,W,…", help="x weights, e.g. 0,0.25,0.5,0.75,1")
        p.add_argument("--adapter2", metavar="FILE", help="a second adapter, varied along y")
        p.add_argument("--weights2", metavar="W,W,…", help="y weights for --adapter2")
        p.add_argument("--prompts", nargs="+", required=True, help="one row (block) per prompt")
        p.add_argument("--seeds", nargs="+", type=int, default=[-1],
                       help="one row per seed, the same seed across a row (default: one random seed)")
        _common(p, grid=True)

    def run(a):
        from . import pipeline as lp
        size = _size(a.size)
        if (a.adapter2 is None) != (a.weights2 is None):
            raise ConfigError("--adapter2 and --weights2 go together")
        for f in filter(None, (a.adapter, a.adapter2)):
            if not os.path.isfile(f):
                raise LycoError(f"{f}: no such adapter file")
        lp._weights(a.weights)
        if a.weights2:
            lp._weights(a.weights2)
        pipe, model_name, model_hash = _load(a)
        out = lp.grid(pipe, a.adapter, a.weights, a.prompts, a.seeds, adapter2=a.adapter2, weights2=a.weights2,
                      negative=a.negative, steps=a.steps, size=size, guidance=a.guidance,
                      adapter_dirs=a.adapter_dir, progress=not a.no_progress, strict=not a.allow_unmatched,
                      model_name=model_name, model_hash=model_hash)
        lp.save_png(out.image, a.output, out.infotext, overwrite=a.overwrite)
        rows, cols = len(out.cells), len(out.cells[0])
        print(f"wrote {a.output} ({out.image.width}x{out.image.height}: {rows} rows x {cols} columns)",
              file=sys.stdout)
        return 0
    return add, run

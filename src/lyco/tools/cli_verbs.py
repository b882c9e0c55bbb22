"""The ``lyco merge | extract | resize | convert | combine`` commands (``inspect`` lives in cli.py).

Each verb parses its arguments and calls the function of the same name in :mod:`lyco.tools`.
"""

from __future__ import annotations

import argparse

from ..cli import command


def _pos_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {v}")
    return v


def _common_out(p, what="output file"):
    p.add_argument("-o", "--output", required=True, metavar="OUT", help=what)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-module lines")


@command("merge", "bake adapters into a base checkpoint (diffusers folder or single-file SD1/SD2/SDXL), "
         "tensor by tensor",
         "lyco merge sd15.safetensors style.safetensors:0.8 char.safetensors:1.0:0.5 -o merged.safetensors\n"
         "  lyco merge ./sdxl-diffusers lora.safetensors -o ./sdxl-merged --dtype fp16\n"
         "  (ADAPTER:W:TE_W = UNet weight W, text-encoder weight TE_W; default 1)")
def _merge():
    def add(p):
        p.add_argument("base", help="diffusers folder or single-file checkpoint (.safetensors, .ckpt)")
        p.add_argument("adapters", nargs="+", metavar="ADAPTER[:WEIGHT[:TE_WEIGHT]]", help="adapter files")
        _common_out(p, "output: a folder for a diffusers base, a .safetensors file for a single-file base")
        p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast every floating tensor "
                       "(default: keep each tensor's dtype)")
        p.add_argument("--allow-unmatched", action="store_true",
                       help="skip (and list) adapter modules that match no weight instead of failing")

    def run(a):
        from . import merge
        merge(a.base, a.adapters, a.output, dtype=a.dtype, allow_unmatched=a.allow_unmatched,
              overwrite=a.overwrite, progress=not a.quiet, verbose=True)
        return 0
    return add, run


@command("extract", "extract an adapter from the difference of two checkpoints (per-layer SVD)",
         "lyco extract sd15.safetensors finetuned.safetensors -o extracted.safetensors --rank 32\n"
         "  lyco extract base/ tuned/ -o lora.safetensors --algo locon --energy 0.95 --conv-rank 8\n"
         "  lyco extract base.safetensors tuned.safetensors -o lokr.safetensors --algo lokr --rank 8")
def _extract():
    def add(p):
        p.add_argument("base", help="the original checkpoint (folder or single file)")
        p.add_argument("tuned", help="the fine-tuned checkpoint, same family")
        _common_out(p)
        p.add_argument("--algo", choices=["lora", "locon", "lokr"], default="lora",
                       help="lora: Linear and 1×1 convs (k×k convs with --conv-rank); locon/lokr: every layer")
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--rank", type=int, help="fixed rank per layer")
        g.add_argument("--ratio", type=float, help="keep σ > RATIO·σ_max")
        g.add_argument("--quantile", type=float, help="keep the σ whose running sum stays below Q·Σσ")
        g.add_argument("--threshold", type=float, help="keep σ > T")
        g.add_argument("--energy", type=float, help="keep at least this share of Σσ² per layer (e.g. 0.99)")
        p.add_argument("--max-rank", type=int, help="cap of the dynamic rules")
        p.add_argument("--conv-rank", type=_pos_int, help="fixed rank of k×k convs (0: leave them out)")
        p.add_argument("--tucker", action="store_true", help="k×k convs with a Tucker core (lora_mid)")
        p.add_argument("--factor", type=int, default=-1, help="LoKr factor (-1: balanced, as LyCORIS)")
        p.add_argument("--exact-svd", action="store_true", help="exact SVD instead of the randomised one")
        p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
        p.add_argument("--min-diff", type=float, default=0.01,
                       help="a text encoder with max|ΔW| ≤ this is treated as unchanged (default 0.01)")
        p.add_argument("--full-ratio", type=float, default=0.5,
                       help="store a layer exactly (diff) when its rank reaches this share of full rank")
        p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp16", help="saved dtype")

    def run(a):
        from . import extract
        extract(a.base, a.tuned, a.output, algo=a.algo, rank=a.rank, ratio=a.ratio, quantile=a.quantile,
                threshold=a.threshold, energy=a.energy, max_rank=a.max_rank, conv_rank=a.conv_rank,
                tucker=a.tucker, exact_svd=a.exact_svd, device=a.device, min_diff=a.min_diff,
                full_ratio=a.full_ratio, factor=a.factor, dtype=a.dtype, overwrite=a.overwrite,
                progress=not a.quiet, verbose=not a.quiet)
        return 0
    return add, run


@command("resize", "change a LoRA/LoCon's rank (LoHa/LoKr become LoRA) keeping its scale; kohya's dynamic "
         "rules; exact DyLoRA prefix cut",
         "lyco resize lora_r64.safetensors -o lora_r16.safetensors --rank 16\n"
         "  lyco resize lora.safetensors -o dyn.safetensors --sv-fro 0.9 --rank 64\n"
         "  lyco resize dylora.safetensors -o dylora_r8.safetensors --prefix 8")
def _resize():
    def add(p):
        p.add_argument("adapter", help="adapter file")
        _common_out(p)
        p.add_argument("--rank", type=int, help="new rank (the cap with a dynamic rule)")
        g = p.add_mutually_exclusive_group()
        g.add_argument("--sv-ratio", type=float, help="keep σ > σ_max / R (kohya sv_ratio)")
        g.add_argument("--sv-fro", type=float, help="keep this share of the Frobenius norm (kohya sv_fro)")
        g.add_argument("--sv-cumulative", type=float, help="keep this share of Σσ (kohya sv_cumulative)")
        p.add_argument("--conv-rank", type=int, help="rank (cap) of k×k conv modules")
        p.add_argument("--prefix", type=int, help="DyLoRA: keep the first B rank components exactly")
        p.add_argument("--base", help="base model, for weight shapes the file does not carry")
        p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="saved dtype (default: the input's)")

    def run(a):
        from . import resize
        resize(a.adapter, a.output, rank=a.rank, sv_ratio=a.sv_ratio, sv_fro=a.sv_fro,
               sv_cumulative=a.sv_cumulative, conv_rank=a.conv_rank, prefix=a.prefix, base=a.base,
               dtype=a.dtype, overwrite=a.overwrite, verbose=not a.quiet)
        return 0
    return add, run


@command("convert", "convert between kohya/LyCORIS and diffusers/PEFT files, SDXL naming styles and dtypes; "
         "edit metadata",
         "lyco convert lora.safetensors -o lora_diffusers.safetensors --to diffusers\n"
         "  lyco convert loha.safetensors -o lora.safetensors --to lora --rank 16\n"
         "  lyco convert sdxl_lora.safetensors -o out.safetensors --naming diffusers --dtype fp16 "
         "--set-meta ss_output_name=mine --strip-meta")
def _convert():
    def add(p):
        p.add_argument("adapter", help="adapter file (kohya/LyCORIS or diffusers/PEFT)")
        _common_out(p)
        p.add_argument("--to", choices=["kohya", "lycoris", "lora", "diffusers", "peft"], default="kohya",
                       help="kohya: every algorithm kept; lora: kohya file of plain LoRA; diffusers/peft: "
                            "diffusers LoRA format (pipe.load_lora_weights)")
        p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="saved dtype")
        p.add_argument("--naming", choices=["auto", "diffusers", "ldm"], default="auto",
                       help="UNet key style of a kohya file (auto: LDM for SDXL, diffusers otherwise)")
        p.add_argument("--set-meta", action="append", metavar="KEY=VALUE", default=[],
                       help="set a metadata key (repeatable; applied last)")
        p.add_argument("--strip-meta", action="store_true",
                       help="drop the input's metadata (only the minimum keys are written)")
        p.add_argument("--rank", type=int, help="rank of a conversion to LoRA by SVD (error reported)")
        p.add_argument("--base", help="base model, for IA3/OFT/GLoRA (ΔW depends on W) and unknown shapes")
        p.add_argument("--bake-scale", action="store_true",
                       help="diffusers: fold alpha/rank into lora_B (for loaders ignoring the header)")

    def run(a):
        from . import convert
        convert(a.adapter, a.output, to=a.to, dtype=a.dtype, naming=a.naming, set_meta=a.set_meta,
                strip_meta=a.strip_meta, rank=a.rank, base=a.base, bake_scale=a.bake_scale,
                overwrite=a.overwrite, verbose=not a.quiet)
        return 0
    return add, run


@command("combine", "combine adapters into one (exact rank concatenation for LoRA-like modules, "
         "else dense sum; SVD to --rank)",
         "lyco combine style.safetensors:0.7 char.safetensors:0.5 -o both.safetensors\n"
         "  lyco combine a.safetensors b_loha.safetensors:0.8 -o ab_r32.safetensors --rank 32")
def _combine():
    def add(p):
        p.add_argument("adapters", nargs="+", metavar="ADAPTER[:WEIGHT[:TE_WEIGHT]]", help="adapter files")
        _common_out(p)
        p.add_argument("--rank", type=int, help="cap every module at this rank (SVD; error reported)")
        p.add_argument("--conv-rank", type=int, help="cap of k×k conv modules")
        p.add_argument("--base", help="base model, needed for IA3/OFT/GLoRA/DoRA modules")
        p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="saved dtype (default: the first input's)")

    def run(a):
        from . import combine
        combine(a.adapters, a.output, rank=a.rank, conv_rank=a.conv_rank, base=a.base, dtype=a.dtype,
                overwrite=a.overwrite, verbose=not a.quiet)
        return 0
    return add, run

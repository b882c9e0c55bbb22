"""CUDA check of lyco.pipeline (run by hand on a GPU machine; not collected by pytest).

    PYTHONPATH=src python tests/pipeline/cuda_smoke.py [OUT_DIR]

On the tiny SD1 and SDXL pipelines, in fp32, fp16 and bf16 on CUDA: adapters of several algorithms
(made on CPU in fp32, attached to a CPU pipeline which is then moved with ``pipe.to("cuda")``, so
``sync_devices`` is exercised) run on the fly, fused (bit-exact unfuse) and agree with an fp32 CPU
pipeline whose weights were merged; a compiled UNet (inductor) matches eager; ``lyco generate``
writes a PNG on CUDA. Prints one line per check and exits non-zero on the first failure.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lyco  # noqa: E402
import lyco.pipeline as lp  # noqa: E402
from _pipeline_helpers import ALGOS, PRESET_SOME, base_pipe, differ, make_adapter_file, run, same_bits, snapshot  # noqa: E402


def check(cond, msg):
    print(("ok   " if cond else "FAIL ") + msg, flush=True)
    if not cond:
        raise SystemExit(1)


def main(out: Path) -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    tmp = Path(tempfile.mkdtemp())
    for family in ("sd1", "sdxl"):
        maker = base_pipe(family)
        files = {n: make_adapter_file(maker, tmp / f"{family}_{n}.safetensors", ALGOS[n], seed=i,
                                      preset=PRESET_SOME)
                 for i, n in enumerate(("lora", "lokr", "dora-lora", "boft", "glora"))}
        for name, f in files.items():
            ref = base_pipe(family)
            lyco.load(f).merge_into(ref, 0.8, te_multiplier=0.6)
            y_ref = run(ref)
            effect = differ(y_ref, run(base_pipe(family)))
            for dtype, rel in ((torch.float32, 2e-3), (torch.float16, 0.05), (torch.bfloat16, 0.1)):
                pipe = base_pipe(family)
                lp.load(pipe, f, 0.8, te_multiplier=0.6)           # attached on CPU …
                pipe.to("cuda", dtype)                              # … then moved
                before = snapshot(pipe)
                y_fly = run(pipe).float().cpu()
                lp.fuse(pipe)
                y_fused = run(pipe).float().cpu()
                lp.unfuse(pipe)
                exact = same_bits(before, snapshot(pipe))
                d1, d2 = differ(y_fly, y_ref), differ(y_fused, y_ref)
                check(exact and d1 <= rel * effect and d2 <= rel * effect,
                      f"{family} {name:9s} {str(dtype)[6:]:8s} on the fly Δ={d1:.3g}, fused Δ={d2:.3g} "
                      f"(effect {effect:.3g}); unfuse bit-exact: {exact}")
    # torch.compile (inductor) on CUDA with an adapter attached
    pipe = base_pipe("sd1").to("cuda", torch.float16)
    lp.load(pipe, files_sd1 := make_adapter_file(base_pipe("sd1"), tmp / "c.safetensors", ALGOS["lora"], seed=9,
                                                  preset=PRESET_SOME), 0.8)
    x = torch.randn(2, 4, 8, 8, device="cuda", dtype=torch.float16)
    ctx = torch.randn(2, 77, 32, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = pipe.unet(x, 10, ctx).sample
        t0 = time.perf_counter()
        explain = torch._dynamo.explain(pipe.unet)(x, 10, ctx)
        compiled = torch.compile(pipe.unet)
        y = compiled(x, 10, ctx).sample
        dt = time.perf_counter() - t0
        check(differ(y, eager) < 2e-2 * max(1.0, eager.abs().max().item()),
              f"inductor-compiled UNet with adapter matches eager (Δ={differ(y, eager):.3g}, "
              f"compile {dt:.1f} s, graph breaks {explain.graph_break_count})")
        lp.set_weights(pipe, "c", unet=-0.5)
        eager2 = pipe.unet(x, 10, ctx).sample
        y2 = compiled(x, 10, ctx).sample
        check(differ(y2, eager2) < 2e-2 * max(1.0, eager2.abs().max().item()) and differ(eager2, eager) > 1e-3,
              "compiled UNet follows set_weights")
    # the CLI on CUDA
    d = tmp / "loras"
    d.mkdir()
    os.link(files_sd1, d / "c.safetensors")
    from lyco.cli import main as cli
    png = out / "cuda_generate.png"
    rc = cli(["generate", "--model", "tiny:sd1", "--prompt", "a cat <lora:c:0.8>", "--adapter-dir", str(d),
              "--device", "cuda", "--dtype", "fp16", "--steps", "4", "--seed", "1", "--size", "64x64",
              "--no-progress", "-o", str(png), "--overwrite"])
    check(rc == 0 and png.exists(), f"lyco generate on cuda fp16 wrote {png.name}")
    print("all CUDA checks passed", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))

"""``lyco eval``: train every algorithm on the world's concepts and score them (see
:mod:`lyco.world.evaluate`)."""

from __future__ import annotations

import os
import sys

from ..cli import command


@command("eval", "train each algorithm on the tiny world's concepts and score fidelity, controllability, "
                 "diversity, preservation and quality (the LyCORIS paper's framework), offline",
         "lyco eval --device cuda --out eval_out\n"
         "  lyco eval --algos lora,loha,lokr4 --concepts star --steps 200 --jobs 2\n"
         "  lyco eval --quick --weights random --out /tmp/eval      # machinery only (random base), ~1 min")
def _eval():
    def add(p):
        from .evaluate import ALGORITHMS, Settings
        d = Settings()
        p.add_argument("--algos", default="all", help=f"comma-separated algorithms (default all: {','.join(ALGORITHMS)})")
        p.add_argument("--concepts", default="all", help="comma-separated concepts (default all: star,stripes)")
        p.add_argument("--out", default="eval_out", help="folder for results.json/.md, tradeoff.png, grid_*.png "
                       "(default eval_out)")
        p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
        p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per adapter (default {d.steps}; "
                       f"--quick: 2)")
        p.add_argument("--batch-size", type=int, default=None, help=f"batch size (default {d.batch_size})")
        p.add_argument("--images", type=int, default=None, help=f"images per concept dataset (default {d.n_images})")
        p.add_argument("--prompts", type=int, default=None, help=f"prompts per prompt set (default {d.n_prompts})")
        p.add_argument("--seeds", default=None, help="comma-separated sampling seeds (default 0,1,2,3)")
        p.add_argument("--sample-steps", type=int, default=None, help=f"DDIM steps (default {d.sample_steps})")
        p.add_argument("--guidance", type=float, default=None, help=f"guidance scale (default {d.guidance})")
        p.add_argument("--lr-scale", type=float, default=1.0, help="multiply every algorithm's learning rate")
        p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                       help="base model dtype during training (adapters train in fp32)")
        p.add_argument("--jobs", type=int, default=1, help="trainings side by side (worker processes; default 1)")
        p.add_argument("--threads", type=int, default=0, help="torch threads per job on CPU (0 = default)")
        p.add_argument("--weights", default="", help="base weights file ('random' = random init; default: the "
                       "shipped pretrained base)")
        p.add_argument("--classifier-weights", default="", help="classifier weights file ('random' = random init)")
        p.add_argument("--work", default=None, help="folder for datasets, adapters and samples (default: a "
                       "temporary folder, removed at the end)")
        p.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
        p.add_argument("--cuda-graph", action="store_true",
                       help="train with [train] cuda_graph: each step replayed as one CUDA graph (needs --device cuda)")
        p.add_argument("--quick", action="store_true", help="CI sizes: 2 steps, 2 prompts × 1 seed, 1 DDIM step")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from ..errors import ConfigError
        from .evaluate import Settings, evaluate
        kw = {}
        for arg, key in (("steps", "steps"), ("batch_size", "batch_size"), ("images", "n_images"),
                         ("prompts", "n_prompts"), ("sample_steps", "sample_steps"), ("guidance", "guidance")):
            v = getattr(a, arg)
            if v is not None:
                kw[key] = v
        if a.seeds:
            try:
                kw["seeds"] = tuple(int(x) for x in a.seeds.split(",") if x.strip())
            except ValueError:
                raise ConfigError(f"--seeds {a.seeds!r}: expected comma-separated integers") from None
        if a.cuda_graph and not a.device.startswith("cuda"):
            raise ConfigError(f"--cuda-graph needs a GPU (--device cuda), not --device {a.device}")
        kw.update(cuda_graph=a.cuda_graph, device=a.device, lr_scale=a.lr_scale, precision=a.precision, jobs=a.jobs, threads=a.threads,
                  weights=a.weights, classifier_weights=a.classifier_weights)
        s = Settings.quick_settings(**kw) if a.quick else Settings(**kw)
        res = evaluate(a.out, a.algos, a.concepts, s, work=a.work, keep_work=a.keep_work,
                       progress=not a.no_progress)
        print(f"\nresults: {res.files['md']}")
        sys.stdout.flush()
        return 0
    return add, run

"""Multi-GPU scaling of lyco's real trainer: accelerate DDP (eager) vs ``[train] cuda_graph``.

``ddp_scaling.py`` measures the training step in isolation; this runs :class:`lyco.train.loop.Trainer`
itself — data loader, latent cache, loss check, eager AdamW, accelerate's process group — under
``torchrun`` on the shipped pretrained world base (``lyco.world``: a 4 M-parameter SD1-shaped model,
32 px), on its *star* concept dataset, with the ``lyco eval`` LoRA (rank 8, attn-mlp, text encoder
trained too), bf16, per-GPU batch ``--batch``. A tiny model is the hardest case for scaling: its step is
all launch overhead, so N eager processes compete for the host.

    benchmarks/run_ddp_trainer.sh OUT            # prepares once, then 1 and 2 GPUs × eager / graph
    torchrun --standalone --nproc_per_node N benchmarks/ddp_trainer.py --work W --out OUT [--cuda-graph]

Time per optimizer step: the trainer's ``step`` event synchronises the device and stamps the time on
rank 0; images/s = batch × processes × steps ÷ (stamp[warmup + steps] − stamp[warmup]). Writes
``OUT/trainer_<N>gpu_<eager|graph>.json`` (rank 0) with the strategy the trainer chose (``ddp``
buckets eager; ``flat`` with graphs), the graph's counters and the last loss.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import StepClock  # noqa: E402  (benchmarks/)


def prepare(work: Path) -> None:
    """The diffusers folder of the world base and the concept dataset (once, before any launch)."""
    from lyco.world import base, scene
    if not (work / "base_model" / "model_index.json").is_file():
        base.save_pretrained_folder(work / "base_model")
    if not (work / "data").is_dir():
        scene.write_concept_dataset("star", work / "data", n=64, seed=0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="folder with base_model/ and data/ (see --prepare)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--prepare", action="store_true", help="only write base_model/ and data/ into --work")
    p.add_argument("--cuda-graph", action="store_true")
    p.add_argument("--batch", type=int, default=16, help="per-GPU batch")
    p.add_argument("--steps", type=int, default=60, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=10)
    a = p.parse_args()
    work = Path(a.work)
    if a.prepare:
        prepare(work)
        return 0

    from lyco.train import from_dict
    from lyco.train.loop import Trainer
    mode = "graph" if a.cuda_graph else "eager"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = from_dict({
        "model": {"path": str(work / "base_model")},
        "data": {"train_dir": str(work / "data"), "resolution": [32, 32], "enable_bucket": False,
                 "cache_dir": str(work / "cache")},
        "network": {"algo": "lora", "rank": 8, "alpha": 8, "preset": "attn-mlp"},
        "optimizer": {"learning_rate": 1e-3},
        "train": {"max_train_steps": a.warmup + a.steps, "batch_size": a.batch,
                  "mixed_precision": "bf16" if torch.cuda.is_available() else "no",
                  "cuda_graph": a.cuda_graph, "seed": 0, "cpu": not torch.cuda.is_available()},
        "output": {"output_dir": str(work / f"out_{world}_{mode}"), "output_name": "lora", "overwrite": True,
                   "save_state": False, "log_with": "none", "progress_bar": False},
        "eval": {"enabled": False},
    })
    clock = StepClock()
    tr = Trainer(cfg, callbacks=[clock])
    res = tr.train()
    acc = tr.accelerator
    if acc.is_main_process:
        w, n = a.warmup, a.steps
        dt = clock.seconds(w, n)
        g = tr._graph
        row = {"processes": acc.num_processes, "mode": mode, "strategy": tr.strategy, "per_gpu_batch": a.batch,
               "steps_timed": n, "ms_per_step": 1000 * dt / n, "images_per_s": a.batch * acc.num_processes * n / dt,
               "last_loss": res.losses[-1][1] if res.losses else None,
               "peak_gib_rank0": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
               "graph": None if g is None else {"captures": g.captures, "replays": g.replays,
                                                "eager_calls": g.eager_calls, "disabled_reason": g.disabled_reason},
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__}
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"trainer_{acc.num_processes}gpu_{mode}.json"), "w") as f:
            json.dump(row, f, indent=1)
        print(json.dumps(row), flush=True)
    tr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

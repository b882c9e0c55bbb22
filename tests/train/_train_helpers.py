"""Helpers for the trainer tests (imported by name; kept out of conftest.py, whose module name is
shared by several test folders)."""

from __future__ import annotations

import contextlib

import torch

from lyco.train import from_dict
from lyco.train.graphs import GraphedStep


class StandInGraph(GraphedStep):
    """``GraphedStep`` with the CUDA parts replaced, for the CPU: *recording* runs the call once (its
    effect on the gradients is rolled back by ``GraphedStep._capture``, as a real capture has none) and
    *replay* re-runs the recorded call on the static input buffers and writes into the captured output
    tensor — the contract of a CUDA graph, without the GPU."""

    runs_without_cuda = True

    def _side_stream(self):
        return contextlib.nullcontext()

    def _record(self, call):
        out = call()

        def replay():
            new = call()
            with torch.no_grad():
                out.copy_(new)
        return replay, out


def make_cfg(out, train_dir, *, model="tiny:sd1", **sections):
    """A fast config: 32 px, batch 2, no progress bar/TensorBoard/fixed-batch eval; ``sections`` update
    the tables."""
    d = {
        "model": {"path": model},
        "data": {"train_dir": str(train_dir), "resolution": [32, 32], "bucket_reso_steps": 32,
                 "min_bucket_reso": 32, "max_bucket_reso": 64, "trigger_word": "lycoshape",
                 "cache_dir": str(out / "cache")},
        "network": {"algo": "lokr", "rank": 4, "options": {"factor": 4}},
        "optimizer": {"learning_rate": 1e-3},
        "train": {"max_train_steps": 4, "batch_size": 2},
        "output": {"output_dir": str(out), "progress_bar": False, "log_with": "none", "save_dtype": "fp32"},
        "eval": {"enabled": False, "num_images": 2, "timesteps": [200, 600]},  # tests that need it enable it
    }
    for s, v in sections.items():
        d.setdefault(s, {}).update(v)
    return from_dict(d)

"""Run by the multi-process tests under ``torch.distributed.run`` (one process per rank).

``argv[1]`` is a JSON plan: ``{"report_dir": DIR, "runs": [{"name": …, "config": {table: {key: value}},
"resume": STATE_OR_NULL, "env": {VAR: VALUE}}, …]}``. The runs train one after the other in the same processes (the
import of torch/diffusers is the slow part of a launch); after each, every rank writes what it saw
to ``<report_dir>/<name>.rank<N>.json`` (a file per rank, so the reports cannot interleave): a hash
of its adapter, the samples it was given, the files it wrote (every output goes through
``safetensors_io.atomic_write``, which is spied on here), its checkpoints and losses.
"""

import hashlib
import json
import os
import sys

import torch

torch.set_num_threads(1)

from lyco.formats import safetensors_io  # noqa: E402
from lyco.train import from_dict  # noqa: E402
from lyco.train import data as D  # noqa: E402
from lyco.train.loop import Trainer, full_tensors  # noqa: E402

seen: list = []
written: list = []
_getitem = D.TrainDataset.__getitem__
_atomic_write = safetensors_io.atomic_write


def spy_getitem(self, key):
    seen.append(list(key))
    return _getitem(self, key)


def spy_atomic_write(path, *a, **kw):
    written.append(str(path))
    return _atomic_write(path, *a, **kw)


D.TrainDataset.__getitem__ = spy_getitem
safetensors_io.atomic_write = spy_atomic_write

plan = json.loads(open(sys.argv[1], encoding="utf-8").read())
import time  # noqa: E402
for run in plan["runs"]:
    t0 = time.time()
    seen.clear()
    written.clear()
    os.environ.update(run.get("env", {}))  # e.g. ACCELERATE_USE_FSDP, as `accelerate launch --use_fsdp` sets it
    if run.get("standin_graph"):  # [train] cuda_graph on the CPU: the stand-in keeps the graph's contract
        from lyco.train import graphs
        from _train_helpers import StandInGraph
        graphs.GraphedStep = StandInGraph
    tr = Trainer(from_dict(run["config"]), resume=run.get("resume"))
    res = tr.train()
    g = tr._graph
    h = hashlib.sha256()
    sd = sorted(tr.network.state_dict().items())
    for (k, _), v in zip(sd, full_tensors([v for _, v in sd])):  # FSDP: gathered (every rank takes part)
        h.update(k.encode())
        h.update(v.cpu().float().numpy().tobytes())
    rank = tr.accelerator.process_index
    report = json.dumps({
        "rank": rank, "world": tr.accelerator.num_processes, "strategy": tr.strategy, "hash": h.hexdigest(),
        "steps": res.steps, "keys": seen, "written": written, "checkpoints": res.checkpoints,
        "states": res.states, "losses": res.losses,
        "graph": None if g is None else {"replays": g.replays, "captures": g.captures,
                                         "flat_adopted": tr._grad_sync is not None and tr._grad_sync._flats is not None},
    })
    with open(f"{plan['report_dir']}/{run['name']}.rank{rank}.json", "w", encoding="utf-8") as f:
        f.write(report)
    tr.accelerator.wait_for_everyone()
    tr.close()
    print(f"[rank {rank}] {run['name']}: {time.time() - t0:.1f}s", flush=True)

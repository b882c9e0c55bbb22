"""Run by test_ddp.py under ``torch.distributed.run`` (one process per rank): trains from a TOML
config (argv[1]) and writes what this rank saw to ``<argv[2]>/rank<N>.json`` (a file per rank, so
the reports cannot interleave)."""

import hashlib
import json
import sys

import torch

torch.set_num_threads(1)

from lyco.train import load_config  # noqa: E402
from lyco.train import data as D  # noqa: E402
from lyco.train.loop import Trainer  # noqa: E402

seen = []
_getitem = D.TrainDataset.__getitem__


def spy(self, key):
    seen.append(list(key))
    return _getitem(self, key)


D.TrainDataset.__getitem__ = spy

tr = Trainer(load_config(sys.argv[1]))
res = tr.train()
h = hashlib.sha256()
for k, v in sorted(tr.network.state_dict().items()):
    h.update(k.encode())
    h.update(v.detach().cpu().float().numpy().tobytes())
report = json.dumps({
    "rank": tr.accelerator.process_index, "world": tr.accelerator.num_processes, "hash": h.hexdigest(),
    "steps": res.steps, "keys": seen, "checkpoints": res.checkpoints, "losses": res.losses,
})
with open(f"{sys.argv[2]}/rank{tr.accelerator.process_index}.json", "w", encoding="utf-8") as f:
    f.write(report)

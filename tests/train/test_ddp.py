"""Two processes (DDP over gloo on the CPU): accelerate shards the batches, the adapter gradients are
synchronised (both ranks end with the same adapter), and only rank 0 writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from lyco.formats.safetensors_io import read_metadata

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_process_ddp(tmp_path, shapes_dir):
    out = tmp_path / "out"
    toml = tmp_path / "ddp.toml"
    toml.write_text(f'''
[model]
path = "tiny:sd1"
[data]
train_dir = "{shapes_dir}"
resolution = 32
bucket_reso_steps = 32
min_bucket_reso = 32
flip_aug = true
[network]
algo = "lokr"
rank = 4
options = {{factor = 4}}
[optimizer]
learning_rate = 1e-2
[train]
max_train_steps = 2
batch_size = 2
[output]
output_dir = "{out}"
progress_bar = false
log_with = "none"
[eval]
enabled = false
''', encoding="utf-8")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2] / "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(WORKER), str(toml), str(tmp_path)], capture_output=True, text=True, timeout=600,
                       env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in res] == [0, 1] and all(r["world"] == 2 for r in res)
    assert res[0]["hash"] == res[1]["hash"]  # gradients were all-reduced: one adapter
    assert res[0]["losses"] == res[1]["losses"]  # the logged loss is the mean over both ranks
    k0 = {tuple(k) for k in res[0]["keys"]}
    k1 = {tuple(k) for k in res[1]["keys"]}
    assert not (k0 & k1)  # each rank got its own batches …
    assert len(k0 | k1) == 8 and {e for _, e, _ in k0 | k1} == {0}  # … together one epoch:
    assert Counter(i for i, _, _ in k0 | k1) == {0: 2, 1: 2, 2: 2, 3: 2}  # 4 images × 2 repeats
    assert res[0]["checkpoints"] == [str(out / "adapter.safetensors")] and res[1]["checkpoints"] == []
    md = read_metadata(out / "adapter.safetensors")
    assert md["ss_total_batch_size"] == "4" and md["ss_steps"] == "2"
    state = json.loads((out / "adapter-state" / "state.json").read_text())
    assert state["num_processes"] == 2

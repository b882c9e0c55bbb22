"""Several processes on the CPU (gloo), launched with ``torch.distributed.run`` (``ddp_worker.py``).

* DDP, DDP with one flat all-reduce, and FSDP: accelerate shards the batches (no sample twice, one
  epoch together), every rank ends with the same adapter, only rank 0 writes anything, and the
  adapter equals the one a single process trains on the same global batches (W processes × batch
  B = one process × batch B × W accumulation steps; same noise, seeded by the global batch index).
  fp32 on the CPU: only the order of the gradient sums differs, so the tolerance is 1e-5 relative.
* FSDP writes the same file as DDP (keys, shapes, dtypes, metadata).
* Resume on another number of processes: 2 → 1 and 1 → 2 (DDP and FSDP states), against an
  uninterrupted single-process run.

One launch of two processes serves both tests (a module fixture: the imports of torch/diffusers
take most of a launch); the single-process references run in the pytest process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lyco.formats.safetensors_io import load_tensors, read_metadata
from lyco.train import from_dict
from lyco.train.loop import Trainer

WORKER = Path(__file__).with_name("ddp_worker.py")
RTOL = 1e-5
# metadata that differ between two runs of the same training: clocks, the random session id, the
# hashes of the (float-noise different) tensors, the config's own record (strategy, output folder)
VOLATILE = {"ss_session_id", "ss_training_started_at", "ss_training_finished_at", "modelspec.date",
            "sshs_model_hash", "sshs_legacy_hash", "lyco_train_config"}


def config(out, train_dir, **sections):
    d = {
        "model": {"path": "tiny:sd1"},
        "data": {"train_dir": str(train_dir), "resolution": [32, 32], "bucket_reso_steps": 32, "min_bucket_reso": 32,
                 "flip_aug": True, "cache_dir": str(out.parent / "cache")},
        "network": {"algo": "lokr", "rank": 4, "options": {"factor": 4}},
        "optimizer": {"learning_rate": 1e-2},
        "train": {"max_train_steps": 2, "batch_size": 2},
        "output": {"output_dir": str(out), "progress_bar": False, "log_with": "none", "save_dtype": "fp32"},
        "eval": {"enabled": False},
    }
    for s, v in sections.items():
        d.setdefault(s, {}).update(v)
    return d


def launch(tmp_path, runs, nproc=2):
    """Run ``runs`` in ``nproc`` processes; returns ``{name: [report of rank 0, rank 1, …]}``."""
    plan = tmp_path / "plan.json"
    reports = tmp_path / "reports"
    reports.mkdir(exist_ok=True)
    plan.write_text(json.dumps({"report_dir": str(reports), "runs": runs}), encoding="utf-8")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2] / "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(nproc), str(WORKER), str(plan)], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return {r["name"]: [json.loads((reports / f"{r['name']}.rank{k}.json").read_text()) for k in range(nproc)]
            for r in runs}


def single(d, resume=None):
    """Train ``d`` in this process (one process)."""
    tr = Trainer(from_dict(d), resume=resume)
    try:
        return tr.train()
    finally:
        tr.close()


def rel_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a)
    den = sum(float(b[k].double().norm() ** 2) for k in a)
    return (num / den) ** 0.5


def adapter(path):
    return load_tensors(path)[0]


LORA = {"algo": "lora", "rank": 4, "options": {}}
# DoRA trains on the rebuilt op (algorithms/rebuild.py: its own autograd Function and backward)
DORA = {"algo": "lora", "rank": 4, "dora": True, "options": {}}
STEPS = {"max_train_steps": 3}
ONE_TO_TWO = {"ddp": {}, "flat": {"ddp_comm": "flat"}, "fsdp": {}, "graph": {}}  # fsdp: asked for as accelerate
# does, below; graph: [train] cuda_graph with the CPU stand-in graph (flat gradient buffers all-reduced in place)
STRATEGY = {"graph": "flat"}


@pytest.fixture(scope="module")
def two(tmp_path_factory, shapes_dir):
    """The 2-process runs of both tests, in one launch. Test 1: DDP, DDP with ddp_comm = flat, FSDP (through
    the environment of `accelerate launch --use_fsdp`), each 2 steps of LoKr. Test 2 (LoRA): a 1-step DDP
    run (its state resumes 2 → 1) and an FSDP run resumed from a single-process state (1 → 2, whole
    tensors dealt into shards)."""
    root = tmp_path_factory.mktemp("two")
    # uninterrupted reference of test 2: one process, global batch 4 (2 × 2 accumulation), a state every step
    ref = root / "ref"
    single(config(ref, shapes_dir, network=LORA, train={**STEPS, "gradient_accumulation_steps": 2},
                  output={"save_every_n_steps": 1}))
    runs = [{"name": k, "config": config(root / k, shapes_dir, distributed=d)} for k, d in ONE_TO_TWO.items()]
    runs[2]["env"] = {"ACCELERATE_USE_FSDP": "true"}  # what `accelerate launch --use_fsdp` sets
    runs[3]["config"]["train"]["cuda_graph"] = True
    runs[3]["standin_graph"] = True
    runs += [{"name": "fresh-ddp", "config": config(root / "fresh-ddp", shapes_dir, network=LORA,
                                                      train={"max_train_steps": 1})},
             {"name": "resume-fsdp", "config": config(root / "resume-fsdp", shapes_dir, network=LORA, train=STEPS,
                                                        distributed={"strategy": "fsdp"}),
              "resume": str(ref / "adapter-step00000001-state")},
             {"name": "fsdp-dora", "config": config(root / "fsdp-dora", shapes_dir, network=DORA,
                                                      distributed={"strategy": "fsdp"})}]
    return root, launch(root, runs)


def test_ddp_flat_and_fsdp_equal_one_process(two, tmp_path, shapes_dir):
    root, reports = two
    outs = {k: root / k for k in ONE_TO_TWO}
    rep = {k: reports[k] for k in ONE_TO_TWO}
    # the reference: one process, the same global batch of 4 as 2 accumulation steps of 2
    ref_out = tmp_path / "one"
    single(config(ref_out, shapes_dir, train={"gradient_accumulation_steps": 2}))
    ref = adapter(ref_out / "adapter.safetensors")

    for name, (r0, r1) in rep.items():
        out = outs[name]
        assert [r0["rank"], r1["rank"], r0["world"]] == [0, 1, 2], name
        assert r0["strategy"] == STRATEGY.get(name, name)
        if name == "graph":  # replayed every micro-batch, gradients averaged from the adopted flat buffers
            assert r0["graph"] == r1["graph"] == {"replays": 2, "captures": 1, "flat_adopted": True}
        assert r0["hash"] == r1["hash"], name  # one adapter on both ranks
        assert r0["losses"] == r1["losses"], name  # the logged loss is the mean over both ranks
        k0, k1 = {tuple(k) for k in r0["keys"]}, {tuple(k) for k in r1["keys"]}
        assert not (k0 & k1), name  # each rank got its own batches …
        assert len(k0 | k1) == 8 and {e for _, e, _ in k0 | k1} == {0}, name  # … together one epoch:
        assert Counter(i for i, _, _ in k0 | k1) == {0: 2, 1: 2, 2: 2, 3: 2}, name  # 4 images × 2 repeats
        # rank 0 writes everything, rank 1 nothing
        assert r1["written"] == [] and r1["checkpoints"] == [], (name, r1["written"])
        assert r0["checkpoints"] == [str(out / "adapter.safetensors")], name
        assert str(out / "adapter.safetensors") in r0["written"], name
        md = read_metadata(out / "adapter.safetensors")
        assert md["ss_total_batch_size"] == "4" and md["ss_steps"] == "2", name
        state = json.loads((out / "adapter-state" / "state.json").read_text())
        assert state["num_processes"] == 2 and state["strategy"] == STRATEGY.get(name, name)
        assert state["epoch"] == 1 and state["global_batches_done"] == 0  # the epoch is done
        # the same training as one process on the same global batches
        got = adapter(out / "adapter.safetensors")
        assert rel_diff(got, ref) < RTOL, (name, rel_diff(got, ref))
    # a real comparison: one process with the per-process batch alone (a global batch of 2) trains
    # something else, far beyond the tolerance
    other = tmp_path / "one-small-batch"
    single(config(other, shapes_dir))
    assert rel_diff(adapter(other / "adapter.safetensors"), ref) > 100 * RTOL

    # FSDP writes the same file as DDP: keys, shapes, dtypes and metadata
    a_ddp, a_fsdp = adapter(outs["ddp"] / "adapter.safetensors"), adapter(outs["fsdp"] / "adapter.safetensors")
    assert {k: (tuple(v.shape), v.dtype) for k, v in a_ddp.items()} == \
        {k: (tuple(v.shape), v.dtype) for k, v in a_fsdp.items()}
    m_ddp = read_metadata(outs["ddp"] / "adapter.safetensors")
    m_fsdp = read_metadata(outs["fsdp"] / "adapter.safetensors")
    assert set(m_ddp) == set(m_fsdp)
    assert {k: v for k, v in m_ddp.items() if k not in VOLATILE} == \
        {k: v for k, v in m_fsdp.items() if k not in VOLATILE}
    assert json.loads(m_fsdp["lyco_train_config"])["distributed"]["strategy"] == "fsdp"
    # and so does the state: the same tensors (whole, not shards)
    s_ddp = load_tensors(outs["ddp"] / "adapter-state" / "state.safetensors")[0]
    s_fsdp = load_tensors(outs["fsdp"] / "adapter-state" / "state.safetensors")[0]
    assert {k: tuple(v.shape) for k, v in s_ddp.items() if not k.startswith("rng.")} == \
        {k: tuple(v.shape) for k, v in s_fsdp.items() if not k.startswith("rng.")}
    opt = {k: v for k, v in s_fsdp.items() if k.startswith("optimizer.") and v.dim() > 0}
    assert opt and rel_diff(opt, {k: s_ddp[k] for k in opt}) < 1e-4


def test_resume_on_another_number_of_processes(two, tmp_path, shapes_dir):
    root, rep = two
    ref_out = root / "ref"
    ref = adapter(ref_out / "adapter.safetensors")
    assert json.loads((ref_out / "adapter-step00000001-state" / "state.json").read_text())["global_batches_done"] == 2

    # 1 → 2 (FSDP): resumed from the single-process state of step 1
    r0, r1 = rep["resume-fsdp"]
    assert r0["hash"] == r1["hash"] and r0["steps"] == 3 and r0["strategy"] == "fsdp"
    # the two steps after the resume took the rest of epoch 0 (global batches 2, 3 = sample slots 4–7)
    # and epoch 1's first two (slots 0–3; the loader also fetches one batch ahead)
    keys = {tuple(x) for r in (r0, r1) for x in r["keys"]}
    assert {slot for _, e, slot in keys if e == 0} == {4, 5, 6, 7}
    assert {slot for _, e, slot in keys if e == 1} >= {0, 1, 2, 3}
    got = adapter(root / "resume-fsdp" / "adapter.safetensors")
    assert rel_diff(got, ref) < RTOL, rel_diff(got, ref)

    # 2 → 1 (DDP state): one process with 2 accumulation steps keeps the global batch
    state = root / "fresh-ddp" / "adapter-state"
    info = json.loads((state / "state.json").read_text())
    assert info["num_processes"] == 2 and info["global_batches_done"] == 2 and info["global_batch"] == 4
    out = tmp_path / "two-then-one"
    single(config(out, shapes_dir, network=LORA, train={**STEPS, "gradient_accumulation_steps": 2}),
           resume=str(state))
    got = adapter(out / "adapter.safetensors")
    assert rel_diff(got, ref) < RTOL, rel_diff(got, ref)
    # a real comparison: after one step the adapter is far (beyond the tolerance) from the reference
    first = adapter(root / "fresh-ddp" / "adapter.safetensors")
    assert rel_diff(first, ref) > 100 * RTOL


def test_rebuilt_op_under_fsdp_equals_one_process(two, tmp_path, shapes_dir):
    """DoRA (mode auto: the rebuilt op, which keeps the adapter tensors and x for its own backward)
    sharded by FSDP over 2 processes trains the adapter one process trains on the same global batches."""
    root, reports = two
    r0, r1 = reports["fsdp-dora"]
    assert r0["strategy"] == "fsdp" and r0["hash"] == r1["hash"]
    ref_out = tmp_path / "one-dora"
    single(config(ref_out, shapes_dir, network=DORA, train={"gradient_accumulation_steps": 2}))
    ref = adapter(ref_out / "adapter.safetensors")
    got = adapter(root / "fsdp-dora" / "adapter.safetensors")
    assert any(k.endswith("dora_scale") for k in got)
    assert rel_diff(got, ref) < RTOL, rel_diff(got, ref)
    # the two runs did train (the comparison is not between two untouched adapters)
    untrained = tmp_path / "dora-0"
    single(config(untrained, shapes_dir, network=DORA, optimizer={"learning_rate": 1e-12}))
    assert rel_diff(adapter(untrained / "adapter.safetensors"), ref) > 100 * RTOL

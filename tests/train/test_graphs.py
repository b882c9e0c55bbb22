"""``[train] cuda_graph``: the capture/replay plumbing of ``lyco.train.graphs.GraphedStep`` and its use
by the trainer, on the CPU.

CI has no GPU, so the CUDA graph itself is replaced by a stand-in with the same contract: *recording*
runs the call once but the recording's side effects on the gradients are undone by ``GraphedStep``
(as a real capture has none), and *replay* re-runs the recorded call on the **static input buffers**
(never on the tensors of the current call) and writes into the **captured output tensor**. A
trainer with it must train exactly as an eager trainer: that checks the static-input copies, the
per-shape keying, in-place gradient accumulation across micro-batches, the discarded warm-up and
the restored RNG state. The real capture is checked on the GPU by ``benchmarks/train_graph.py``
(eager vs graph adapters compared there)."""

from __future__ import annotations

import pytest
import torch

from lyco.errors import ConfigError
from lyco.formats.safetensors_io import load_tensors
from lyco.train.graphs import GraphedStep
from lyco.train.loop import Trainer
from lyco.train.synthetic import make_shapes

from _train_helpers import StandInGraph, make_cfg


def _loss_fn(w):
    def fn(inp):
        loss = ((inp["x"] @ w - inp["y"]) ** 2).mean()
        loss.backward()
        return loss.detach()
    return fn


def test_replay_uses_new_inputs_and_accumulates_like_eager():
    torch.manual_seed(0)
    w = torch.randn(3, 2, requires_grad=True)
    batches = [{"x": torch.randn(4, 3), "y": torch.randn(4, 2)} for _ in range(3)]
    batches.append({"x": torch.randn(5, 3), "y": torch.randn(5, 2)})  # another shape: a second graph
    ref_w = w.detach().clone().requires_grad_(True)
    ref_losses = [float(_loss_fn(ref_w)(b)) for b in batches]  # eager, accumulating into ref_w.grad

    g = StandInGraph(_loss_fn(w), [w], warmup=3)
    losses = [float(g(b)) for b in batches]
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-6, atol=1e-7)  # warm-up/capture discarded
    assert (g.captures, g.replays, g.eager_calls, len(g.graphs)) == (2, 4, 0, 2)


def test_warm_up_and_capture_run_as_a_graph_step(monkeypatch):
    """The warm-up calls and the recorded call run inside ``graph_policy.graph_step`` (LoHa's/LoKr's kernels
    and the low-rank bypass op are meant for captured steps; lyco/algorithms/graph_policy.py), an eager call
    outside it."""
    from lyco.algorithms import factor_triton, lowrank
    monkeypatch.delenv("LYCO_FACTOR_KERNELS", raising=False)
    monkeypatch.delenv("LYCO_BYPASS_OP", raising=False)
    w = torch.randn(3, 2, requires_grad=True)
    seen = []
    inner = _loss_fn(w)

    def fn(inp):
        seen.append(factor_triton.wanted() and lowrank.bypass_wanted())
        return inner(inp)

    g = StandInGraph(fn, [w], warmup=2)
    g({"x": torch.randn(4, 3), "y": torch.randn(4, 2)})
    assert seen[:3] == [True, True, True]  # two warm-up calls and the recording
    assert not factor_triton.wanted() and not lowrank.bypass_wanted()
    g.disabled_reason = "off"
    g({"x": torch.randn(4, 3), "y": torch.randn(4, 2)})
    assert seen[-1] is False  # an eager step


def test_capture_failure_falls_back_to_eager_without_side_effects(caplog):
    w = torch.randn(3, 2, requires_grad=True)
    w.grad = torch.full_like(w, 0.5)  # mid-accumulation
    calls = {"n": 0}

    def fn(inp):
        calls["n"] += 1
        loss = ((inp["x"] @ w) ** 2).mean()
        loss.backward()
        if calls["n"] == 2:  # the second warm-up call: as an op that syncs with the host would
            raise RuntimeError("operation not permitted when stream is capturing")
        return loss.detach()

    g = StandInGraph(fn, [w], warmup=2)
    x = torch.randn(4, 3)
    expect = w.grad + torch.autograd.grad(((x @ w) ** 2).mean(), w)[0]
    with caplog.at_level("WARNING", logger="lyco.train"):
        g({"x": x})
    assert g.disabled_reason and "not permitted" in g.disabled_reason
    assert "test_graphs.py" in g.disabled_reason and "in fn)" in g.disabled_reason  # where it came from
    assert "could not be captured" in caplog.text
    torch.testing.assert_close(w.grad, expect)  # only the eager call's gradient was added
    g({"x": x})
    assert (g.captures, g.replays, g.eager_calls) == (0, 0, 2)


class _FlakyRecord(StandInGraph):
    """A stand-in whose first ``fail`` recordings fail as a capture does (after running the call: a real capture
    runs the forward and backward before its end fails)."""

    def __init__(self, *a, fail: int, **k):
        super().__init__(*a, **k)
        self.fail, self.recordings = fail, 0

    def _record(self, call):
        self.recordings += 1
        if self.recordings <= self.fail:
            call()
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        return super()._record(call)


@pytest.mark.parametrize("fail", [1, 2])
def test_a_failed_capture_is_tried_once_more(caplog, fail):
    """One failed capture: warmed up and captured again, then replayed — with no trace of the failed attempt on the
    gradients; two: the step runs eagerly, as for any failure."""
    torch.manual_seed(0)
    w = torch.randn(3, 2, requires_grad=True)
    w.grad = torch.full_like(w, 0.25)
    ref_w = w.detach().clone().requires_grad_(True)
    ref_w.grad = w.grad.clone()
    batches = [{"x": torch.randn(4, 3), "y": torch.randn(4, 2)} for _ in range(3)]
    ref = [float(_loss_fn(ref_w)(b)) for b in batches]
    g = _FlakyRecord(_loss_fn(w), [w], warmup=2, fail=fail)
    with caplog.at_level("WARNING", logger="lyco.train"):
        got = [float(g(b)) for b in batches]
    assert got == pytest.approx(ref, rel=1e-6)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-6, atol=1e-7)
    assert "capturing once more" in caplog.text and g.retried == 1
    if fail == 1:
        assert (g.captures, g.replays, g.eager_calls, g.disabled_reason) == (1, 3, 0, None)
    else:
        assert (g.captures, g.replays, g.eager_calls) == (0, 0, 3)
        assert "previous error during capture" in g.disabled_reason and "could not be captured" in caplog.text


def test_more_shapes_than_max_graphs_run_eagerly():
    w = torch.randn(3, 2, requires_grad=True)
    g = StandInGraph(_loss_fn(w), [w], max_graphs=2)
    for n in (2, 3, 4, 2, 4):
        g({"x": torch.randn(n, 3), "y": torch.randn(n, 2)})
    assert (g.captures, g.replays, g.eager_calls) == (2, 3, 2)


@pytest.mark.parametrize("accum", [1, 2])
def test_trainer_with_graphed_step_trains_exactly_as_eager(tmp_path, accum):
    """Same config, seed and data, once eager and once through the stand-in graph (two aspect-ratio
    buckets → two graphs, gradient accumulation, rank dropout drawn on the device): identical adapters."""
    data = tmp_path / "train"
    make_shapes(data / "2_lycoshape", 6, seed=3, sizes=((32, 32), (64, 32)))

    def run(sub, graphed):
        out = tmp_path / sub
        cfg = make_cfg(out, data, network={"algo": "lora", "rank": 4, "options": {"rank_dropout": 0.25}},
                       data={"resolution": [48, 48]},  # buckets 32×32 and 64×32 (area ≤ 48²)
                       train={"max_train_steps": 4, "gradient_accumulation_steps": accum},
                       output={"save_state": False})
        tr = Trainer(cfg).setup()
        if graphed:
            tr._graph = StandInGraph(tr._graph_fn, list(tr.network.parameters()))
            tr._grads_to_none = False
        res = tr.train()
        return tr, load_tensors(res.adapter_path)[0]

    _, eager = run("eager", False)
    tr, graphed = run("graph", True)
    assert tr._graph.captures == 2 and tr._graph.replays == 4 * accum and tr._graph.eager_calls == 0
    assert set(eager) == set(graphed)
    for k in eager:
        torch.testing.assert_close(graphed[k], eager[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("sections, words", [
    ({"network": {"options": {"module_dropout": 0.1}}}, "module_dropout"),
    ({"network": {"algo": "dylora"}}, "dylora"),
    ({"distributed": {"strategy": "fsdp"}}, "fsdp"),
    ({"train": {"cpu": True}}, "needs a GPU"),
])
def test_config_refuses_what_a_graph_cannot_replay(tmp_path, shapes_dir, sections, words):
    sec = {k: dict(v) for k, v in sections.items()}
    sec.setdefault("train", {})["cuda_graph"] = True
    with pytest.raises(ConfigError, match=words):
        make_cfg(tmp_path, shapes_dir, **sec)


def test_cuda_graph_without_a_gpu_is_a_clear_error(tmp_path, shapes_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = make_cfg(tmp_path, shapes_dir, train={"cuda_graph": True})
    with pytest.raises(ConfigError, match="cuda_graph = true needs a CUDA GPU"):
        Trainer(cfg).setup()


@pytest.mark.parametrize("processes, cuda_graph, ddp_comm, strategy, expect", [
    (1, True, "buckets", "ddp", "single"),
    (2, False, "buckets", "ddp", "ddp"),
    (2, True, "buckets", "ddp", "flat"),  # DDP's bucket hooks would fire inside the captured backward
    (2, False, "flat", "ddp", "flat"),
    (2, False, "buckets", "fsdp", "fsdp"),
])
def test_several_processes_with_cuda_graph_average_gradients_after_the_replay(tmp_path, shapes_dir, processes,
                                                                             cuda_graph, ddp_comm, strategy, expect):
    from types import SimpleNamespace
    cfg = make_cfg(tmp_path, shapes_dir, distributed={"ddp_comm": ddp_comm, "strategy": strategy},
                   train={"cuda_graph": cuda_graph})
    tr = Trainer(cfg)
    tr.accelerator = SimpleNamespace(num_processes=processes)
    assert tr.strategy == expect


class _TwoRanks:
    """A stand-in for torch.distributed with 2 ranks whose other rank's gradient is all ones: an all-reduce
    adds 1 to every element. Records what it was given."""

    def __init__(self):
        self.reduced = []

    def get_world_size(self):
        return 2

    def all_reduce(self, t):
        self.reduced.append(t)
        t.add_(1.0)


def _mixed_params():
    torch.manual_seed(0)
    ps = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True),
          torch.randn(2, 2, dtype=torch.float64, requires_grad=True), torch.randn(7, 1, requires_grad=True)]
    return ps


def test_flat_gradient_views_are_all_reduced_in_place_without_copies():
    from lyco.train.loop import FlatGradSync
    ps = _mixed_params()
    g = StandInGraph(lambda inp: None, ps)
    g.ensure_grads()
    assert len(g.flat_grads) == 2  # float32 and float64
    grads = [torch.randn(p.shape, dtype=p.dtype) for p in ps]
    with torch.no_grad():
        for p, v in zip(ps, grads):
            p.grad.add_(v)  # what a backward accumulating into the views does
    assert all(p.grad._base is not None for p in ps)
    dist = _TwoRanks()
    sync = FlatGradSync(ps, dist=dist)
    assert sync.adopt(g.flat_grads)
    sync.sync()
    assert [id(t) for t in dist.reduced] == [id(f) for f in g.flat_grads]  # the buffers themselves
    for p, v in zip(ps, grads):
        torch.testing.assert_close(p.grad, (v + 1) / 2)


def test_flat_sync_falls_back_to_copies_when_the_gradients_are_not_the_adopted_views():
    from lyco.train.loop import FlatGradSync
    ps = _mixed_params()
    g = StandInGraph(lambda inp: None, ps)
    g.ensure_grads()
    sync = FlatGradSync(ps, dist=_TwoRanks())
    assert sync.adopt(g.flat_grads)
    v = torch.randn(5)
    ps[1].grad = v.clone()  # replaced, not zeroed: the flat buffer no longer holds this gradient
    sync.sync()
    torch.testing.assert_close(ps[1].grad, (v + 1) / 2)
    torch.testing.assert_close(ps[0].grad, torch.full((3, 4), 0.5))
    # buffers that do not cover every gradient, or gradients that are not views, are refused
    other = FlatGradSync(ps, dist=_TwoRanks())
    assert not other.adopt(g.flat_grads)  # ps[1].grad is no longer a view
    assert not other.adopt(None)
    qs = _mixed_params()
    for q in qs:
        q.grad = torch.zeros_like(q)
    assert not FlatGradSync(qs, dist=_TwoRanks()).adopt(g.flat_grads)

"""``[train] cuda_graph = "auto"`` (the default): on only where a CUDA graph can replay the step, off with a
reason otherwise; ``true``/``false`` as before. The resolution (:func:`lyco.train.config.resolve_cuda_graph`),
the TOML/flag values, and the trainer's use of the resolved value on the CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lyco.cli import build_parser
from lyco.errors import ConfigError
from lyco.train import config as C
from lyco.train.loop import Trainer

from _train_helpers import StandInGraph, make_cfg

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_lokr.toml"
DROP = {"pattern": "*.attn1.*", "module_dropout": 0.2}


def _cfg(**sections):
    return C.from_dict({s: dict(v) for s, v in sections.items()})


# (sections, device type, expected on, words in the reason); the expectations are the specification:
# auto is on only on a CUDA device, not with cpu = true, FSDP, module_dropout > 0 anywhere or DyLoRA
CASES = [
    ({}, "cuda", True, ["auto"]),
    ({}, "cpu", False, ["auto", "cpu", "not a CUDA GPU"]),
    ({}, "mps", False, ["auto", "mps"]),
    ({"train": {"cpu": True}}, "cuda", False, ["auto", "[train] cpu = true"]),
    ({"distributed": {"strategy": "fsdp"}}, "cuda", False, ["auto", "fsdp"]),
    ({"network": {"options": {"module_dropout": 0.1}}}, "cuda", False, ["auto", "module_dropout"]),
    ({"network": {"options": {"module_dropout": 0.0, "dropout": 0.1, "rank_dropout": 0.1}}}, "cuda", True,
     ["auto"]),  # device-side randomness is replayed correctly
    ({"network": {"overrides": [DROP]}}, "cuda", False, ["auto", "module_dropout"]),
    ({"network": {"overrides": [{"pattern": "*.attn1.*", "options": {"module_dropout": 0.3}}]}}, "cuda", False,
     ["module_dropout"]),
    ({"network": {"overrides": [{"pattern": "*.attn1.*", "rank": 16}]}}, "cuda", True, ["auto"]),
    ({"network": {"algo": "dylora"}}, "cuda", False, ["auto", "dylora"]),
    ({"network": {"overrides": [{"pattern": "*.attn1.*", "algo": "dylora"}]}}, "cuda", False, ["dylora"]),
    ({"train": {"cuda_graph": True}}, "cuda", True, ["cuda_graph = true"]),
    ({"train": {"cuda_graph": True}}, "cpu", True, ["cuda_graph = true"]),  # the trainer refuses the device
    ({"train": {"cuda_graph": False}}, "cuda", False, ["cuda_graph = false"]),
    ({"train": {"cuda_graph": False, "cpu": True}}, "cpu", False, ["cuda_graph = false"]),
    ({"train": {"cuda_graph": "auto"}}, "cuda", True, ["auto"]),
]


@pytest.mark.parametrize("sections, device, on, words", CASES)
def test_resolution(sections, device, on, words):
    got, reason = C.resolve_cuda_graph(_cfg(**sections), device)
    assert got is on
    for w in words:
        assert w in reason, (reason, w)


@pytest.mark.parametrize("sections, words", [
    ({"network": {"options": {"module_dropout": 0.1}}}, "module_dropout"),
    ({"network": {"overrides": [DROP]}}, "module_dropout"),
    ({"network": {"algo": "dylora"}}, "dylora"),
    ({"network": {"overrides": [{"pattern": "*.attn1.*", "algo": "dylora"}]}}, "dylora"),
    ({"distributed": {"strategy": "fsdp"}}, "fsdp"),
    ({"train": {"cpu": True}}, "needs a GPU"),
])
def test_true_is_strict_and_auto_is_not(sections, words):
    """What "auto" turns off silently is an error with ``true`` (as before "auto" existed)."""
    with pytest.raises(ConfigError, match=words):
        _cfg(**{**sections, "train": {**sections.get("train", {}), "cuda_graph": True}})
    assert _cfg(**sections).train.cuda_graph == "auto"  # valid


@pytest.mark.parametrize("text, value", [
    ("", "auto"),  # the default
    ("cuda_graph = true", True),
    ("cuda_graph = false", False),
    ('cuda_graph = "auto"', "auto"),
    ('cuda_graph = "true"', True),
    ('cuda_graph = "False"', False),
    ('cuda_graph = "AUTO"', "auto"),
])
def test_toml_values(tmp_path, text, value):
    p = tmp_path / "c.toml"
    p.write_text(f"[train]\n{text}\n", encoding="utf-8")
    cfg = C.load(p)
    assert cfg.train.cuda_graph == value and type(cfg.train.cuda_graph) is type(value)
    again = tmp_path / "again.toml"  # --print-config's file reads back the same value
    again.write_text(C.commented_toml(cfg), encoding="utf-8")
    assert C.load(again).train.cuda_graph == value


@pytest.mark.parametrize("text", ['"maybe"', "3", "1", "0.5", '""', "[true]"])
def test_bad_value_names_the_key_and_the_accepted_values(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(f"[train]\ncuda_graph = {text}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        C.load(p)
    msg = str(e.value)
    assert "[train] cuda_graph" in msg and '"auto", true or false' in msg
    with pytest.raises(ConfigError, match=r"\[train\] cuda_graph"):
        C.from_dict({}).replace(train={"cuda_graph": "maybe"})


@pytest.mark.parametrize("argv, file_value, value", [
    ([], None, "auto"),
    (["--cuda-graph"], None, True),
    (["--cuda_graph"], None, True),  # kohya spelling
    (["--no-cuda-graph"], None, False),
    ([], "false", False),  # no flag: the file's value
    (["--cuda-graph"], "false", True),  # the flag overrides the file
    (["--no-cuda-graph"], "true", False),
])
def test_flags(tmp_path, argv, file_value, value):
    p = tmp_path / "c.toml"
    p.write_text("" if file_value is None else f"[train]\ncuda_graph = {file_value}\n", encoding="utf-8")
    args = build_parser().parse_args(["train", str(p), *argv])
    got = C.load(args.config, C.flags_from_args(args)).train.cuda_graph
    assert got == value and type(got) is type(value)


def test_example_file_uses_the_default():
    assert C.load(EXAMPLE).train.cuda_graph == C.TrainConfig().cuda_graph == "auto"


# ------------------------------------------------------------------------------------------ the trainer
def _trainer(tmp_path, shapes_dir, **sections):
    return Trainer(make_cfg(tmp_path, shapes_dir, **sections)).setup()


def test_default_cpu_run_stays_eager_and_says_why(tmp_path, shapes_dir, caplog):
    with caplog.at_level(logging.INFO, logger="lyco.train"):
        tr = _trainer(tmp_path, shapes_dir)
    assert tr.cfg.train.cuda_graph == "auto"
    assert tr.cuda_graph is False and tr._graph is None and tr.strategy == "single"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cuda_graph:")]
    assert len(lines) == 1 and lines[0].startswith("cuda_graph: off (auto: ") and "cpu" in lines[0]


def _pretend_cuda(monkeypatch):
    """"auto" decides on with the CPU stand-in graph, as it would on a GPU (the device is CUDA there)."""
    from lyco.train import graphs, loop
    monkeypatch.setattr(graphs, "GraphedStep", StandInGraph)
    monkeypatch.setattr(loop, "resolve_cuda_graph", lambda cfg, device: C.resolve_cuda_graph(cfg, "cuda"))


def test_auto_on_builds_the_graph(tmp_path, shapes_dir, monkeypatch, caplog):
    _pretend_cuda(monkeypatch)
    with caplog.at_level(logging.INFO, logger="lyco.train"):
        tr = _trainer(tmp_path, shapes_dir)
    assert tr.cuda_graph is True and isinstance(tr._graph, StandInGraph)
    assert "cuda_graph: on (auto)" in caplog.text


def _preset_with_module_dropout(tmp_path):
    p = tmp_path / "md_preset.toml"
    p.write_text('name = "md"\n[unet]\ntarget_modules = ["Transformer2DModel"]\n'
                 '[text_encoder]\ntarget_modules = ["CLIPAttention"]\n'
                 '[[overrides]]\npattern = "*.attn1.*"\nmodule_dropout = 0.5\n', encoding="utf-8")
    return str(p)


def test_a_preset_files_module_dropout_turns_auto_off(tmp_path, shapes_dir, monkeypatch, caplog):
    """The config check cannot see a preset file's overrides; the built network is checked as well."""
    _pretend_cuda(monkeypatch)
    net = {"algo": "lora", "rank": 4, "options": {}, "preset": _preset_with_module_dropout(tmp_path)}
    with caplog.at_level(logging.INFO, logger="lyco.train"):
        tr = _trainer(tmp_path / "auto", shapes_dir, network=net)
    dropping = [n for n, layer in tr.network.layers.items() if layer.opts.get("module_dropout", 0) > 0]
    assert dropping, "the preset's override reached no layer: the test checks nothing"
    assert tr.cuda_graph is False and tr._graph is None
    assert "cuda_graph: off (auto: module_dropout > 0" in caplog.text
    with pytest.raises(ConfigError, match=r"cuda_graph = true is not supported with module_dropout"):
        _trainer(tmp_path / "true", shapes_dir, network=net, train={"cuda_graph": True})


@pytest.mark.parametrize("device, sections, expect", [
    ("cpu", {}, "ddp"),  # auto on the CPU: no graph, so DDP's buckets
    ("cuda", {}, "flat"),  # auto on a GPU: a graph, so one flat all-reduce after the replay
    ("cuda", {"train": {"cuda_graph": False}}, "ddp"),
    ("cuda", {"network": {"options": {"module_dropout": 0.1}}}, "ddp"),
])
def test_several_processes_follow_the_resolved_value(tmp_path, shapes_dir, device, sections, expect):
    from types import SimpleNamespace

    import torch
    tr = Trainer(make_cfg(tmp_path, shapes_dir, **sections))
    tr.accelerator = SimpleNamespace(num_processes=2, device=torch.device(device))
    assert tr.strategy == expect

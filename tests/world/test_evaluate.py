"""``lyco eval`` end to end at CI sizes (``--quick``) on a random-weight base: every algorithm trains
through lyco's trainer, its *file* is sampled, every output file is written with the right rows.

The numbers of a random base mean nothing; what is checked is the machinery: the files, the rows,
the settings table, that scores are valid fractions, that the base row preserves itself, and —
independently of the runner — that the stored samples are what loading the saved adapter file
onto a fresh pipeline gives.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from lyco.errors import ConfigError
from lyco.world import evaluate as E

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    s = E.Settings.quick_settings(weights="random", threads=1, steps=1)  # one step: CI time, still a change
    res = E.evaluate(root / "out", "all", "star", s, work=root / "work", progress=False, say=lambda *_: None)
    return root, res


def test_all_files_and_rows(quick_run):
    root, res = quick_run
    out = root / "out"
    assert sorted(p.name for p in out.iterdir()) == ["grid_star.png", "results.json", "results.md", "tradeoff.png"]
    r = json.loads((out / "results.json").read_text())
    assert r["meta"]["partial"] is False and r["meta"]["pretrained"] is False
    # after 11 adapters came and went, the base pipeline draws exactly what it drew before
    assert r["meta"]["base_drift"] < 1e-5
    assert [(x["algo"], x["concept"]) for x in r["rows"]] == [("base", "star")] + [(a, "star") for a in E.ALGORITHMS]
    seeds = len(r["settings"]["seeds"])
    for row in r["rows"]:
        for k in ("fidelity", "controllability", "preservation", "quality"):
            assert 0.0 <= row[k] <= 1.0, (row["algo"], k, row[k])
        assert 1.0 - 1e-9 <= row["diversity"] <= seeds + 1e-9
        if row["algo"] != "base":
            assert row["file_bytes"] > 0 and row["params"] > 0 and row["train_s"] > 0 and row["sample_s"] > 0
            assert row["steps"] == r["settings"]["steps"]
    base = r["rows"][0]
    # the base model compared with itself (same prompts, same seeds)
    assert base["preservation"] == 1.0 and base["scores"]["preservation"]["pixel"] == 1.0
    # the settings table covers every algorithm, with what was measured
    assert set(r["algorithms"]) == set(E.ALGORITHMS)
    assert all(a["params"] and a["file_bytes"] for a in r["algorithms"].values())
    md = (out / "results.md").read_text()
    for a in E.ALGORITHMS.values():
        assert f"| {a.label} | star |" in md      # score table row
        assert f"| {a.label} | {a.network['algo']} |" in md  # settings table row
    # grid: a title/header band, then rows target + base + every algorithm
    g = Image.open(out / "grid_star.png")
    assert g.size[1] > (2 + len(E.ALGORITHMS)) * 80
    assert Image.open(out / "tradeoff.png").size[0] > 300


def test_parameter_counts_differ_as_designed(quick_run):
    _root, res = quick_run
    p = {a: v["params"] for a, v in res.results["algorithms"].items()}
    assert p["ia3"] < p["lora"] < p["full"]          # per-channel scales < rank 8 < every weight
    assert p["dora"] > p["lora"]                      # + one magnitude per output channel
    assert p["locon"] > p["lora"]                     # + the convolutions


def test_samples_come_from_the_saved_file(quick_run):
    """Rebuild one algorithm's trigger samples independently: a fresh pipeline from the same base
    weights, the adapter file loaded with lyco.load + attach, the same prompt and seed."""
    root, res = quick_run
    from lyco import load
    from lyco.formats.safetensors_io import load_tensors
    from lyco.world import base
    s = E.Settings(**{**res.results["settings"], "seeds": tuple(res.results["settings"]["seeds"])})
    work = root / "work"
    stored, _ = load_tensors(work / "runs" / "lora_star.samples.safetensors")
    pipe = base.load_pipeline(weights=work / "random_base.safetensors")
    handle = load(work / "runs" / "lora_star" / "lora_star.safetensors").attach(pipe)
    ps = res.results["prompts"]["trigger"]["star"]
    one = E.PromptSet(ps["prompts"][:1], [], ps["seeds"][:1])
    img = E.generate(pipe, one, s)
    handle.detach()
    assert torch.allclose(img, stored["trig.images"][:1].float(), atol=2e-2)
    # and without the adapter the picture differs (the file did something)
    base_img = E.generate(pipe, one, s)
    assert not torch.allclose(base_img, img, atol=1e-4)


def test_cli_two_concepts(tmp_path):
    from lyco.cli import main
    rc = main(["eval", "--quick", "--weights", "random", "--algos", "ia3", "--concepts", "star,stripes",
               "--out", str(tmp_path / "o"), "--threads", "1", "--no-progress"])
    assert rc == 0
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [(x["algo"], x["concept"]) for x in r["rows"]] == [("base", "star"), ("ia3", "star"),
                                                              ("base", "stripes"), ("ia3", "stripes")]
    assert (tmp_path / "o" / "grid_stripes.png").is_file() and (tmp_path / "o" / "grid_star.png").is_file()
    assert all(math.isfinite(x["fidelity"]) for x in r["rows"])


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        E.parse_algos("lora,nope")
    with pytest.raises(ConfigError, match="moon"):
        E.parse_concepts("star,moon")
    with pytest.raises(ConfigError, match="missing.safetensors"):
        E.evaluate(tmp_path / "o", "lora", "star", E.Settings.quick_settings(weights=str(tmp_path / "missing.safetensors")),
                   progress=False, say=lambda *_: None)


def test_cuda_graph_reaches_the_trainer_config_and_needs_a_gpu(tmp_path, capsys):
    from lyco.cli import main
    paths = {"model_dir": "m", "data:star": "d", "cache:star": "c"}
    on = E.train_config(E.ALGORITHMS["lora"], "star", paths, str(tmp_path), E.Settings(device="cuda", cuda_graph=True))
    off = E.train_config(E.ALGORITHMS["lora"], "star", paths, str(tmp_path), E.Settings(device="cuda"))
    assert on.train.cuda_graph is True and off.train.cuda_graph is False
    rc = main(["eval", "--quick", "--cuda-graph", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc != 0 and "--cuda-graph needs a GPU (--device cuda), not --device cpu" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

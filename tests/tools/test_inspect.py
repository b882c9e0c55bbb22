"""lyco inspect --json / --plot work with files of every algorithm; the verbs' --help has an example."""

from __future__ import annotations

import json

import pytest
import torch

import lyco
from lyco.cli import main
from lyco.tools import inspect

from _tools_common import ALGOS

KEYS = [*ALGOS, "norm"]


def test_inspect_json_and_plot_for_every_algorithm(algo_files, tmp_path, capsys):
    for key in KEYS:
        f = algo_files[("sd1", key)]
        assert main(["inspect", str(f), "--json"]) == 0, key
        info = json.loads(capsys.readouterr().out)
        a = lyco.load(f)
        assert info["num_modules"] == len(a.modules) and info["family"] == "sd1", key
        assert all(m["param_norm"] > 0 for m in info["modules"]), key
        if a.modules[next(iter(a.modules))].algorithm.weight_independent:
            # ‖ΔW‖ without the base model, LoHa/LoKr included (their files may not carry the kernel)
            assert all(m["delta_norm"] is not None and m["delta_norm"] > 0 for m in info["modules"]), key
            assert info["block_norms"], key
    # plots: ‖ΔW‖ per block (LoHa: no kernel in the file), ‖tensors‖ when ΔW needs the base (OFT, IA3)
    for key in ("loha-conv", "diag-oft", "ia3", "norm"):
        png = tmp_path / f"{key}.png"
        assert main(["inspect", str(algo_files[("sd1", key)]), "--plot", str(png), "--no-modules"]) == 0, key
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
        assert "plot written" in capsys.readouterr().out


def test_delta_norms_match_the_dense_delta(algo_files):
    for key in ("loha", "lokr", "loha-conv"):
        a = lyco.load(algo_files[("sd1", key)])
        info = inspect(a)
        for m in info["modules"][::7]:
            ma = a.modules[m["name"]]
            from lyco.tools._common import dense_delta, weight_shape
            dw = dense_delta(ma, weight_shape(m["name"], ma, "sd1"), dtype=torch.float64)
            assert m["delta_norm"] == pytest.approx(float(dw.norm()), rel=1e-5)


@pytest.mark.parametrize("verb", ["merge", "extract", "resize", "convert", "combine", "inspect"])
def test_help_has_an_example(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"lyco {verb} " in out


def test_clear_errors(tmp_path, capsys):
    assert main(["resize", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "o.safetensors"),
                 "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert "missing.safetensors" in err and "Traceback" not in err
    assert main(["merge", str(tmp_path / "nope"), str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "o")]) == 2
    assert "lyco merge: error:" in capsys.readouterr().err

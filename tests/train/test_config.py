"""Config: TOML → validated dataclasses, flags override the file, clear errors."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from lyco.cli import build_parser, main
from lyco.errors import ConfigError
from lyco.train import config as C

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_lokr.toml"


def _write(tmp_path, text, name="cfg.toml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_are_valid():
    cfg = C.from_dict({})
    assert cfg.optimizer.learning_rate == 1e-4 and cfg.network.algo == "lora" and cfg.resolution == (512, 512)


@pytest.mark.parametrize("text, needle", [
    ("[train]\nlerning_rate = 1\n", "'lerning_rate'"),
    ("[train]\nlearning_rate = 1e-4\n", "[train] unknown key 'learning_rate'"),
    ("[trian]\nbatch_size = 1\n", "'trian'"),
    ("batch_size = 2\n", "belongs in the [train] table"),
    ("[network]\nrank = \"8\"\n", "[network] rank: expected an integer"),
    ("[network]\nrank = 0\n", "[network] rank must be >= 1"),
    ("[train]\nmixed_precision = \"fp8\"\n", "[train] mixed_precision: 'fp8' is not one of"),
    ("[data]\ncaption_dropout_rate = 1.5\n", "caption_dropout_rate must be within [0, 1]"),
    ("[data]\nresolution = [512, 500]\n", "multiples of 8"),
    ("[optimizer]\nbetas = [0.9]\n", "betas must be two numbers"),
    ("[train]\nshuffle = true\n", "[train] unknown key 'shuffle'"),
    ("[data]\nflip_aug = 1\n", "[data] flip_aug: expected true or false"),
    ("[[network.overrides]]\nrank = 4\n", "needs a 'pattern'"),
    ("[network]\ntrain_unet = false\ntrain_text_encoder = false\n", "nothing to train"),
    ("[train]\nmax_timestep = 10\nmin_timestep = 20\n", "max_timestep (10) must be > min_timestep (20)"),
    ("[train\n", "not valid TOML"),
])
def test_validation_errors_name_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        C.load(_write(tmp_path, text))
    assert needle in str(e.value)


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'batch_size'"):
        C.load(_write(tmp_path, "[train]\nbatchsize = 4\n"))


def test_missing_file_and_runnable_checks(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        C.load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"\[model\] path"):
        C.check_runnable(C.from_dict({}))
    with pytest.raises(ConfigError, match=r"\[data\] train_dir"):
        C.check_runnable(C.from_dict({"model": {"path": "tiny:sd1"}}))


def test_relative_paths_are_relative_to_the_file(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    p = _write(sub, '[model]\npath = "tiny:sd1"\n[data]\ntrain_dir = "../imgs"\n[output]\noutput_dir = "o"\n')
    cfg = C.load(p)
    assert cfg.data.train_dir == str(tmp_path / "imgs")
    assert cfg.output.output_dir == str(sub / "o")
    assert cfg.model.path == "tiny:sd1"  # built-in names are not paths


def test_flags_override_the_file(tmp_path, monkeypatch):
    p = _write(tmp_path, '[optimizer]\nlearning_rate = 1e-4\n[train]\nbatch_size = 1\n[data]\nflip_aug = true\n'
                         '[network]\nalgo = "lokr"\noptions = {factor = 4, dropout = 0.1}\n'
                         '[sample]\nprompts = ["from file"]\n')
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args([
        "train", str(p), "--lr", "0.5", "--batch_size", "3", "--no-flip-aug", "--network-option", "factor=8",
        "--network-option", "use_tucker=true", "--sample-prompt", "a", "--sample-prompt", "b c",
        "--resolution", "256", "384", "--output-dir", "rel/out", "--network-override",
        '{"pattern": "*.attn2.*", "rank": 16}', "--sample-seeds", "1", "2", "--no-eval"])
    cfg = C.load(args.config, C.flags_from_args(args))
    assert cfg.optimizer.learning_rate == 0.5
    assert cfg.train.batch_size == 3
    assert cfg.data.flip_aug is False
    assert cfg.network.options == {"factor": 8, "use_tucker": True}  # the flag table replaces the file's
    assert cfg.network.overrides == [{"pattern": "*.attn2.*", "rank": 16}]
    assert cfg.sample.prompts == ["a", "b c"] and cfg.sample.seeds == [1, 2]
    assert cfg.resolution == (256, 384)
    assert cfg.output.output_dir == str(tmp_path / "rel" / "out")  # flags: relative to the cwd
    assert cfg.eval.enabled is False
    assert cfg.network.algo == "lokr"  # untouched keys keep the file's value


def test_every_option_has_a_unique_flag():
    seen = set()
    for s, cls in C.SECTIONS.items():
        for f in fields(cls):
            fl = C.flag_of(s, f)
            assert fl not in seen
            seen.add(fl)
            assert f.metadata.get("help"), f"[{s}] {f.name} has no help text"
    assert len(seen) == sum(len(fields(c)) for c in C.SECTIONS.values())


def test_example_file_lists_every_option_and_loads():
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    for s, cls in C.SECTIONS.items():
        expected = {f.name for f in fields(cls)}
        if s == "network":
            expected -= {"overrides"}
        optional = {f.name for f in fields(cls) if getattr(cls(), f.name) is None}  # commented out
        missing = expected - set(data.get(s, {})) - optional
        assert not missing, f"examples/train_lokr.toml lacks [{s}] {sorted(missing)}"
        for name in optional - set(data.get(s, {})):
            assert f"# {name} =" in EXAMPLE.read_text(encoding="utf-8"), f"[{s}] {name} is not documented"
    text = EXAMPLE.read_text(encoding="utf-8")
    for s, cls in C.SECTIONS.items():  # each option's comment is the current help text and flag
        for f in fields(cls):
            if not (s == "network" and f.name == "overrides"):
                assert f"# {f.metadata['help']}  (flag: --{C.flag_of(s, f)})" in text, f"[{s}] {f.name}"
    cfg = C.load(EXAMPLE)
    assert cfg.network.algo == "lokr"
    assert Path(cfg.data.train_dir).is_dir(), "the shipped dataset must be where the example says"


def test_print_config_round_trips(tmp_path, capsys):
    assert main(["train", str(EXAMPLE), "--print-config", "--rank", "16", "--lr", "0.001"]) == 0
    out = capsys.readouterr().out
    p = _write(tmp_path, out)
    a, b = C.load(EXAMPLE).to_dict(), C.load(p).to_dict()
    assert b["network"]["rank"] == 16 and b["optimizer"]["learning_rate"] == 0.001
    b["network"]["rank"], b["optimizer"]["learning_rate"] = a["network"]["rank"], a["optimizer"]["learning_rate"]
    assert a == b


def test_cli_reports_config_errors_cleanly(tmp_path, capsys):
    p = _write(tmp_path, "[train]\nbatch_sise = 4\n")
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err
    assert "lyco train: error:" in err and "batch_sise" in err and "Traceback" not in err


def test_replace_validates():
    cfg = C.from_dict({})
    assert cfg.replace(train={"batch_size": 8}).train.batch_size == 8
    with pytest.raises(ConfigError):
        cfg.replace(train={"batch_size": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        cfg.replace(train={"nope": 1})


def test_train_help_lists_every_key(capsys):
    """``lyco train --help`` renders (argparse %-formats help texts: a literal % in a declaration once
    crashed it) and shows the flag of every declared key."""
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for section, cls in C.SECTIONS.items():
        for f in fields(cls):
            assert f"--{C.flag_of(section, f)}" in out, (section, f.name)
    assert "the first 5%)" in out

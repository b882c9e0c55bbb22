"""benchmarks/_common.py ``shape_table`` (the experiments' per-shape tables): layers of one (in, out) counted together,
each configuration checked and timed per shape, the sums per model weighted by the counts, the best per shape, and a
configuration that raises recorded (its sum NaN) — on the CPU, with the CUDA-graph timer replaced by a fixed table."""

import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import _common  # noqa: E402


def test_shape_table_counts_sums_and_failures(monkeypatch, capsys):
    # µs a call by (configuration, in): "slow" always 5; "fast" 1 at in=4, 9 at in=8 — the best per shape differs
    us = {("fast", 4): 1.0, ("fast", 8): 9.0, ("slow", 4): 5.0, ("slow", 8): 5.0}

    def fake_graph_us(fn, reps):
        assert reps == 10
        return fn()  # each configuration returns its µs as its "output"

    monkeypatch.setattr(_common, "graph_us", fake_graph_us)
    layers = {"m": [(16, 4, 2, 3), (77, 4, 2, 2), (16, 8, 2, 1)]}  # (4, 2) twice: 5 layers of it
    seen = []

    def make(inp, out):
        seen.append((inp, out))
        return (inp,), 0.0, (inp, out)

    def boom(inp):
        raise RuntimeError("no compile")

    cfgs = {"fast": lambda inp: us[("fast", inp)], "slow": lambda inp: us[("slow", inp)], "boom": boom}
    recs = _common.shape_table(layers, cfgs, make, lambda got, want: abs(got - want) / 10,
                               rate=lambda t, args: 100.0 / t)
    assert seen == [(4, 2), (8, 2)]
    r4, r8, summary = recs
    assert r4["layers"] == 5 and r8["layers"] == 1 and r4["shape"] == (4, 2)
    assert r4["fast_us"] == 1.0 and r4["fast_err"] == 0.1 and r4["fast_tbs"] == 100.0 and r8["slow_tbs"] == 20.0
    assert r4["boom_us"].startswith("failed: RuntimeError")
    assert summary["summed_ms"]["fast"] == round((5 * 1 + 9) / 1e3, 3)
    assert summary["summed_ms"]["slow"] == round((5 * 5 + 5) / 1e3, 3)
    assert math.isnan(summary["summed_ms"]["boom"])
    assert summary["summed_ms_best"] == round((5 * 1 + 5) / 1e3, 3)  # fast at in=4, slow at in=8
    assert capsys.readouterr().out.count("\n") == 3  # one JSON line per record

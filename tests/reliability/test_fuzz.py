"""Every reader that takes input from strangers, fuzzed with a seeded, bounded number of cases.

The only acceptable outcomes of a case are success or a ``LycoError`` with a clean, bounded
message; a crash (another exception type), a hang (per-case time limit), a large RSS jump, a
marker file created by a hostile pickle, or raw terminal control characters in an error or in the
``lyco inspect`` report fail the test, listing each case (reproduce one with
``python -m lyco.fuzz --reader R --start CASE --cases 1``).

CI mode runs the case counts below (tuned so the whole folder stays within a few minutes on two
shared cores); ``LYCO_FUZZ_CASES=N`` runs N per reader (long local mode).
"""

from __future__ import annotations

import pytest

from lyco import fuzz

from _reliability_common import record

#: CI-mode cases per reader (cheap readers run more; see RELIABILITY.md for measured times)
CI_CASES = {
    "safetensors": 1000,
    "kohya": 500,
    "peft": 400,
    "legacy": 600,
    "checkpoint": 300,
    "preset": 1000,
    "train_config": 1000,
    "dataset": 250,
    "infotext": 2000,
}


def test_every_reader_is_fuzzed():
    assert set(CI_CASES) == set(fuzz.READERS)


@pytest.mark.parametrize("reader", list(CI_CASES))
def test_fuzz_reader(reader, corpus, tmp_path):
    n = fuzz.cases_from_env(CI_CASES[reader])
    rep = fuzz.run(reader, n, seed=0, workdir=tmp_path, corpus=corpus, timeout=20.0)
    record("fuzz", reader, rep.to_json())
    assert rep.cases == n
    assert not rep.findings, rep.summary()
    # the mutations must reach past the first checks: some inputs load, some are refused
    n_ok = rep.outcomes.get("ok", 0)
    n_err = sum(v for k, v in rep.outcomes.items() if k.startswith("error:"))
    assert n_err > 0, rep.summary()
    if reader not in ("legacy",):  # every legacy case is hostile or damaged by construction
        assert n_ok > 0, rep.summary()

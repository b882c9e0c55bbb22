"""Shared fixtures of the reliability suite: one torch thread (2 shared cores), the fuzz corpus and
tiny models built once per session, and a collector of measured figures.

``LYCO_FUZZ_CASES=N`` runs every fuzzed reader with N cases (long local mode);
``LYCO_RELIABILITY_REPORT=path.json`` writes the figures the suite measured (fuzz outcomes per
reader, crash-kills survived, bad inputs by kind) for RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*torchvision.*")

FIGURES: dict[str, dict] = {"fuzz": {}, "kills": {}, "bad_inputs": {}}


def record(section: str, key: str, value) -> None:
    FIGURES.setdefault(section, {})[key] = value


def bad_input(kind: str, result: str) -> None:
    """Count one hostile input of ``kind`` and how lyco answered."""
    d = FIGURES["bad_inputs"].setdefault(kind, {})
    d[result] = d.get(result, 0) + 1


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("LYCO_RELIABILITY_REPORT")
    if out:
        with open(out, "w") as f:
            json.dump(FIGURES, f, indent=1, sort_keys=True, default=str)


@pytest.fixture(scope="session")
def corpus():
    from lyco.fuzz import Corpus
    return Corpus.shared()


@pytest.fixture(scope="session")
def sd1(corpus):
    return corpus.sd_target("sd1")


@pytest.fixture(scope="session")
def sd2(corpus):
    return corpus.sd_target("sd2")


@pytest.fixture(scope="session")
def sdxl(corpus):
    return corpus.sd_target("sdxl")


def state_of(comps) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a dict of components, cloned."""
    return {f"{c}.{k}": v.detach().clone() for c, m in comps.items() for k, v in m.state_dict().items()}


def assert_bit_identical(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k in before:
        a, b = before[k], after[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                           b.view(torch.uint8) if b.is_floating_point() else b), f"{k} changed"

"""``graph_policy.env_int``, the numeric settings beside the fast paths' switches (``LYCO_KRON_WGRAD_BLOCK``,
``LYCO_FORWARD_MERGED_DEPTH``, …): the default where unset, the value where set, and an error that names the variable,
what it counts and what was expected for anything else — a negative count included, which used to pass silently."""

from __future__ import annotations

import pytest

from lyco.algorithms import graph_policy


def test_unset_gives_the_default(monkeypatch):
    monkeypatch.delenv("LYCO_TEST_COUNT", raising=False)
    assert graph_policy.env_int("LYCO_TEST_COUNT", 37, "things") == 37


@pytest.mark.parametrize("raw,want", [("0", 0), ("12", 12), (" 8192 ", 8192)])
def test_set_gives_the_value(monkeypatch, raw, want):
    monkeypatch.setenv("LYCO_TEST_COUNT", raw)
    assert graph_policy.env_int("LYCO_TEST_COUNT", 37, "things") == want


@pytest.mark.parametrize("raw", ["-1", "x", "1.5", ""])
def test_anything_else_is_an_error_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("LYCO_TEST_COUNT", raw)
    with pytest.raises(ValueError) as err:
        graph_policy.env_int("LYCO_TEST_COUNT", 37, "things")
    msg = str(err.value)
    assert "LYCO_TEST_COUNT" in msg and repr(raw) in msg and "≥ 0" in msg and "things" in msg


def test_a_higher_least(monkeypatch):
    monkeypatch.setenv("LYCO_TEST_COUNT", "1")
    with pytest.raises(ValueError, match="≥ 2"):
        graph_policy.env_int("LYCO_TEST_COUNT", 4, "things", least=2)
    monkeypatch.setenv("LYCO_TEST_COUNT", "2")
    assert graph_policy.env_int("LYCO_TEST_COUNT", 4, "things", least=2) == 2

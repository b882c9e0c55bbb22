"""Fixtures for tests/reliability live in _reliability_common.py (a uniquely named module, so that
``from _reliability_common import …`` never resolves to another folder's conftest)."""

from _reliability_common import *  # noqa: F401,F403

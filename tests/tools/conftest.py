"""Fixtures for tests/tools live in _tools_common.py (a uniquely named module, so that
``from _tools_common import …`` never resolves to another folder's conftest)."""

from _tools_common import *  # noqa: F401,F403

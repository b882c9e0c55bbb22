"""Fixtures for the trainer tests: a tiny dataset; one torch thread (the tests run next to others on
2 cores; the tiny models do not gain from more threads). Helpers live in ``_train_helpers.py`` (a
unique module name: several test folders have a ``conftest.py``)."""

from __future__ import annotations

import pytest
import torch

from lyco.train.synthetic import make_shapes

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """4 captioned 32×32 concept images in a kohya '2_lycoshape' repeat folder."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root / "train" / "2_lycoshape", 4, seed=3, sizes=((32, 32),))
    return root / "train"


@pytest.fixture(scope="session")
def reg_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reg")
    make_shapes(root / "1_shape", 2, seed=5, style="plain", sizes=((32, 32),))
    return root

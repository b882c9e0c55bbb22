"""Pipeline tests: one torch thread (the tests share 2 cores with other work and the tiny models
gain nothing from more threads); fixtures giving fresh tiny pipelines."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*should be kept in float32.*")

from _pipeline_helpers import base_pipe  # noqa: E402


@pytest.fixture
def sd1():
    return base_pipe("sd1")


@pytest.fixture
def sdxl():
    return base_pipe("sdxl")

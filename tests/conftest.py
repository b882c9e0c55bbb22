"""Suite-wide settings.

Under pytest-xdist (``make test`` runs ``-n 2`` on 2 cores) every worker gets **one** torch thread: the
workers already fill the cores, and more threads per worker oversubscribe them — OpenMP's spinning
threads then make CPU-bound tests several times slower (a 10 s trainer test took 111 s). A test module
may set another count at import time (collection imports every module in every worker, so the last one
imported would win for the whole run); this fixture sets the count again before each test. The
environment variables reach the processes tests start (gloo workers, kill tests).

Triton kernels (``lyco.algorithms.lowrank_triton``) run in Triton's interpreter on CPU tensors: the suite
is CPU-only, and Triton decides when it is imported whether its own library functions are interpreted,
so ``TRITON_INTERPRET`` is set here, before anything imports it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    for _k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_k] = "1"
    torch.set_num_threads(1)


def pytest_collection_finish(session):
    """Collection imported every test module, and a module may set its own thread count at import
    (``tests/world/test_pretrained.py``: 2): back to one before the first test. The per-test fixture below
    runs too late for session- and module-scoped fixtures, which pytest builds before it — a shared model's
    base outputs computed with 2 threads in a worker's first test, compared with 1-thread outputs later,
    differed in the fifth digit (tests/interop's "nothing modified" checks failed on a clean clone)."""
    if _WORKER:
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread_per_xdist_worker():
    if _WORKER:
        torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def triton_interpreter():
    """Triton's interpreter with NumPy ≥ 2.4: triton 3.6's interpreter turns a loop bound (a 1-element
    array) into an int with ``int()``, which NumPy ≥ 2.4 refuses; the element is read instead while the
    module's tests run (compiled kernels on the GPU never go through this)."""
    import triton.runtime.interpreter as interp

    orig = interp._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    yield interp
    interp._patch_lang_tensor = orig

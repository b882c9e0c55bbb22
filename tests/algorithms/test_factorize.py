"""factorization / power2factorization: documented examples, invariants, and LyCORIS parity."""

import pytest

from lyco.algorithms.factorize import factorization, power2factorization
from lyco.errors import ConfigError

from lycoris.functional.general import factorization as ly_factorization
from lycoris.functional.general import power2factorization as ly_power2factorization

# The documented examples (reference §1.3 / the task brief); the only hard-coded results here.
FACTORIZATION_EXAMPLES = [
    ((320,), (16, 20)), ((768,), (24, 32)), ((1280,), (32, 40)), ((3072,), (48, 64)),
    ((320, 8), (8, 40)), ((768, 8), (8, 96)), ((127,), (1, 127)), ((360, 16), (15, 24)),
    ((250, 4), (2, 125)),
]
POWER2_EXAMPLES = [((768, 16), (12, 64)), ((1280, 16), (10, 128)), ((3072, 32), (24, 128))]


@pytest.mark.parametrize("args,expected", FACTORIZATION_EXAMPLES)
def test_factorization_examples(args, expected):
    assert factorization(*args) == expected


@pytest.mark.parametrize("args,expected", POWER2_EXAMPLES)
def test_power2factorization_examples(args, expected):
    assert power2factorization(*args) == expected


@pytest.mark.parametrize("factor", [4, 8])
def test_power2factorization_impossible_raises(factor):
    with pytest.raises(ConfigError, match="320"):
        power2factorization(320, factor)


def test_factorization_invariants():
    for dim in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 8, 16):
            m, n = factorization(dim, factor)
            assert m * n == dim and 1 <= m <= n, (dim, factor, m, n)
            if factor > 0 and dim % factor == 0:
                assert factor in (m, n)


def test_power2factorization_invariants():
    for dim in range(2, 400, 2):
        for factor in (-1, 2, 4, 8, 16, 32):
            try:
                m, n = power2factorization(dim, factor)
            except ConfigError:
                continue
            assert m * n == dim and m % 2 == 0 and n & (n - 1) == 0
            assert factor == -1 or m <= factor


def test_factorization_matches_lycoris():
    factors = list(range(-2, 40)) + [64, 100, 128, 512]
    dims = list(range(1, 260)) + [320, 360, 640, 768, 960, 1024, 1280, 2048, 2560, 3072, 4096, 5120]
    for dim in dims:
        for factor in factors:
            assert factorization(dim, factor) == ly_factorization(dim, factor), (dim, factor)


def test_power2factorization_matches_lycoris():
    for dim in list(range(1, 300)) + [320, 640, 768, 1024, 1280, 2048, 2560, 3072]:
        for factor in (-2, -1, 0, 1, 2, 4, 6, 8, 10, 12, 16, 32, 64, 400):
            expected = ly_power2factorization(dim, factor)
            if expected[0] is None:  # LyCORIS returns (None, 0); we raise
                with pytest.raises(ConfigError):
                    power2factorization(dim, factor)
            else:
                assert power2factorization(dim, factor) == expected, (dim, factor)

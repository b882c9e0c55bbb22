"""Splitting a dimension into two factors (LoKr's Kronecker split, OFT/BOFT block sizes).

``factorization(dim, factor)`` → ``(m, n)`` with ``m ≤ n`` and ``m·n = dim``:

* ``factor > 0`` that divides ``dim``: ``(factor, dim/factor)``, sorted;
* otherwise greedy from ``(1, dim)``: step ``m`` up through the divisors of ``dim`` while ``m < n``,
  stopping as soon as ``m + n`` would grow or ``m`` would exceed ``factor`` (a negative factor
  means no cap). ``factor == 0`` caps ``m`` at 0, i.e. gives ``(1, dim)``, as LyCORIS does.

Examples: 320→(16,20), 768→(24,32), 1280→(32,40), 3072→(48,64), (320,8)→(8,40),
(768,8)→(8,96), 127→(1,127), (360,16)→(15,24), (250,4)→(2,125).

``power2factorization(dim, factor)`` → ``(m, n)``: the largest even ``m ≤ factor`` dividing
``dim`` such that ``n = dim/m`` is a power of two (BOFT: block size m, 2**k blocks).
"""

from __future__ import annotations

from ..errors import ConfigError


def _next_divisor(dim: int, m: int) -> int:
    d = m + 1
    while dim % d:
        d += 1
    return d


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)``, ``m ≤ n``, ``m·n = dim``: LyCORIS's Kronecker split of ``dim`` (see module doc)."""
    dim, factor = int(dim), int(factor)
    if dim < 1:
        raise ConfigError(f"factorization: dimension must be a positive integer, got {dim}")
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (m, n) if m <= n else (n, m)
    cap = dim if factor < 0 else factor
    m, n = 1, dim
    while m < n:
        new_m = _next_divisor(dim, m)
        new_n = dim // new_m
        if new_m + new_n > m + n or new_m > cap:
            break
        m, n = new_m, new_n
    # stepping through a divisor pair can land on (n, m) with m > n (e.g. 320: (16,20)→(20,16))
    return (m, n) if m <= n else (n, m)


def _is_power_of_two(q: int) -> bool:
    return q > 0 and q & (q - 1) == 0


def power2factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)``: the largest even ``m ≤ factor`` with ``m·n = dim`` and ``n`` a power of two.

    ``factor == -1`` means no cap (``m ≤ dim``). Raises :class:`ConfigError` when no such split
    exists (e.g. 320 with factor 4 or 8). Where LyCORIS returns ``(None, 0)`` we raise instead.
    """
    dim, factor = int(dim), int(factor)
    if dim < 1:
        raise ConfigError(f"power2factorization: dimension must be a positive integer, got {dim}")
    cap = dim if factor == -1 else min(factor, dim)
    best = None
    for m in range(2, cap + 1, 2):
        if dim % m == 0 and _is_power_of_two(dim // m):
            best = m
    if best is None:
        raise ConfigError(
            f"cannot split dimension {dim} into an even block size ≤ {factor if factor != -1 else dim} "
            f"times a power-of-two block count; choose another block size (factor)")
    return best, dim // best

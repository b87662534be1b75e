"""Normalized Hadamard matrices (H @ H.T == I, every entry +-1/sqrt(n)) for the QoQ rotations.

An order n is split as n = m * 2^a with the largest power of two for which m has a construction here:

- m = 1: Sylvester, H_2^a = H_2 (x) H_2 (x) ... with H_2 = [[1, 1], [1, -1]].
- m = q + 1, q a prime power with q = 3 (mod 4): Paley construction I (skew Hadamard, I + S where S
  borders the Jacobsthal matrix of GF(q)).
- m = 2(q + 1), q a prime power with q = 1 (mod 4): Paley construction II (the symmetric conference
  matrix of GF(q) with each entry replaced by a 2x2 block).

For a given m the candidates are tried in this order: Paley I with prime q, Paley II with prime q,
Paley I with a prime power q, Paley II with a prime power q; the result is H_m (x) H_2^a / sqrt(n).

Orders n <= 200 with a construction: 1, 2 and every multiple of 4 except 92, 116, 156, 172, 184 and 188.
Of the small orders deepcompressor stores, 12, 20, 28, 36, 40 (= 20 * 2), 52 (Paley II over GF(25)),
60, 108 and 140 are built; 156 and 172 (Williamson matrices there) are not. The hidden, intermediate and
head sizes of the common Llama / Mistral / Qwen2 / SmolLM2 models are covered, e.g. 576 = 36 * 16,
960 = 60 * 16, 5120 = 20 * 256, 7168 = 28 * 256, 14336 = 28 * 512, 4864 = 76 * 64, 18944 = 148 * 128,
and the powers of two (64, 128, 2048, 4096, 8192, ...).
"""

from __future__ import annotations

from functools import lru_cache
from itertools import product

import numpy as np

from qserve_lite.errors import QServeLiteError

__all__ = ["hadamard", "hadamard_decomposition", "is_hadamard_order"]


# ---- small number theory ----

def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q == p**k and p prime, else None."""
    if q < 2:
        return None
    p = 2
    while p * p <= q:
        if q % p == 0:
            break
        p += 1
    else:
        return q, 1  # q is prime
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


# ---- GF(p^k): elements are the integers 0..q-1, read as base-p digit vectors (polynomial coefficients) ----

def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficient lists lowest degree first, f monic."""
    a = [c % p for c in a]
    d = len(f) - 1
    for top in range(len(a) - 1, d - 1, -1):
        c = a[top]
        if c:
            for i in range(d + 1):
                a[top - d + i] = (a[top - d + i] - c * f[i]) % p
    return a[:d] + [0] * (d - len(a[:d]))


def _irreducible(p: int, k: int) -> list[int]:
    """The first (in lexicographic order of the low coefficients) monic irreducible polynomial of degree k."""
    def divisible_by_some_factor(f: list[int]) -> bool:
        for d in range(1, k // 2 + 1):
            for low in product(range(p), repeat=d):
                g = list(low) + [1]
                if not any(_poly_mod(f, g, p)):
                    return True
        return False

    for low in product(range(p), repeat=k):
        f = list(low) + [1]
        if f[0] != 0 and not divisible_by_some_factor(f):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _quadratic_character_table(q: int) -> tuple[np.ndarray, np.ndarray]:
    """(diff, chi): diff[i, j] is the element a_j - a_i, chi[x] the quadratic character (0, 1 or -1) of x."""
    pk = _prime_power(q)
    assert pk is not None
    p, k = pk
    digits = np.array([[(x // p**i) % p for i in range(k)] for x in range(q)], dtype=np.int64)  # [q, k]
    weights = p ** np.arange(k, dtype=np.int64)
    diff = ((digits[None, :, :] - digits[:, None, :]) % p) @ weights  # [q, q]
    chi = -np.ones(q, dtype=np.int8)
    chi[0] = 0
    if k == 1:
        squares = {(x * x) % p for x in range(1, p)}
    else:
        f = _irreducible(p, k)
        squares = set()
        for x in range(1, q):
            a = digits[x].tolist()
            sq = [0] * (2 * k - 1)
            for i in range(k):
                for j in range(k):
                    sq[i + j] += a[i] * a[j]
            r = _poly_mod(sq, f, p)
            squares.add(int(np.dot(r, weights)))
    chi[sorted(squares)] = 1
    return diff, chi


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(a_j - a_i) over GF(q), int8 [q, q]."""
    diff, chi = _quadratic_character_table(q)
    return chi[diff]


# ---- constructions (all +-1 int8 matrices, unnormalized) ----

def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int8)
    h2 = np.array([[1, 1], [1, -1]], dtype=np.int8)
    while h.shape[0] < n:
        h = np.kron(h2, h)
    return h


def _paley1(q: int) -> np.ndarray:
    """Order q + 1 (q = 3 mod 4): H = I + S, S = [[0, 1^T], [-1, Q]] is skew-symmetric with S S^T = q I."""
    s = np.zeros((q + 1, q + 1), dtype=np.int8)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + np.eye(q + 1, dtype=np.int8)


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1) (q = 1 mod 4): the symmetric conference matrix C = [[0, 1^T], [1, Q]] with
    0 -> [[1, -1], [-1, -1]] and +-1 -> +-[[1, 1], [1, -1]]."""
    c = np.zeros((q + 1, q + 1), dtype=np.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    plus = np.array([[1, 1], [1, -1]], dtype=np.int8)
    zero = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    return np.kron(c, plus) + np.kron(np.eye(q + 1, dtype=np.int8), zero)


def _paley_method(m: int) -> tuple[str, int] | None:
    """('paley1' | 'paley2', q) that builds order m, or None."""
    q1 = m - 1
    q2 = m // 2 - 1 if m % 2 == 0 else -1
    pk1 = _prime_power(q1) if q1 % 4 == 3 else None
    pk2 = _prime_power(q2) if q2 > 0 and q2 % 4 == 1 else None
    if pk1 is not None and pk1[1] == 1:
        return "paley1", q1
    if pk2 is not None and pk2[1] == 1:
        return "paley2", q2
    if pk1 is not None:
        return "paley1", q1
    if pk2 is not None:
        return "paley2", q2
    return None


def hadamard_decomposition(n: int) -> tuple[int, int, str] | None:
    """(m, 2^a, method) with n == m * 2^a chosen as `hadamard` does (largest power of two first), or None
    when no construction here covers n. method is 'sylvester' (m == 1), 'paley1 q=..' or 'paley2 q=..'."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        return None
    n = int(n)
    a = (n & -n).bit_length() - 1  # 2^a is the largest power of two dividing n
    for b in range(a, -1, -1):
        m = n >> b
        if m == 1:
            return 1, 1 << b, "sylvester"
        found = _paley_method(m)
        if found is not None:
            return m, 1 << b, f"{found[0]} q={found[1]}"
    return None


def is_hadamard_order(n: int) -> bool:
    """True when `hadamard(n)` can build a matrix of order n."""
    return hadamard_decomposition(n) is not None


@lru_cache(maxsize=8)
def _hadamard_cached(n: int) -> np.ndarray:
    m, pow2, method = hadamard_decomposition(n)
    if m == 1:
        core = np.ones((1, 1), dtype=np.int8)
    else:
        kind, q = _paley_method(m)
        core = _paley1(q) if kind == "paley1" else _paley2(q)
    h = np.kron(core, _sylvester(pow2)).astype(np.float64)
    h *= 1.0 / np.sqrt(n)
    h.setflags(write=False)
    return h


def hadamard(n: int) -> np.ndarray:
    """The normalized Hadamard matrix of order n: float64 [n, n], orthogonal, entries +-1/sqrt(n).

    Deterministic (see the module docstring for the construction). The result is cached (the last 8
    orders; `hadamard.cache_clear()` frees them) and read-only: copy it before writing. Raises
    QServeLiteError for an order with no construction here.
    """
    if hadamard_decomposition(n) is None:
        raise QServeLiteError(
            f"no Hadamard matrix of order {n} is available: supported orders are m * 2^a with m = 1, "
            "m = q + 1 (q a prime power, q = 3 mod 4) or m = 2(q + 1) (q a prime power, q = 1 mod 4); "
            "e.g. 12, 20, 28, 36, 60, 108, 140 times a power of two. Orders needing other constructions "
            "(e.g. 156, 172, 92) are not supported; run without this rotation for such a model"
        )
    return _hadamard_cached(int(n))


hadamard.cache_clear = _hadamard_cached.cache_clear

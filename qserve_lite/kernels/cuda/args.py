"""Argument checks and pointer helpers shared by the launchers of this folder (CuPy arrays in, kernel
arguments out). CuPy is imported at call time (core.backend.import_cupy), so importing this module needs
no GPU."""

from __future__ import annotations

import numpy as np

from qserve_lite.core.backend import import_cupy

NULL = np.uint64(0)


def ptr_or_null(a):
    """The array itself (CuPy passes its device pointer) or a null pointer for None."""
    return NULL if a is None else a


def aligned16(a) -> bool:
    return a.data.ptr % 16 == 0


def c_rows(a, name: str):
    """2-D with unit stride along the last axis (row stride free)."""
    if a.ndim != 2 or (a.shape[1] > 1 and a.strides[1] != a.itemsize):
        raise ValueError(f"{name}: expected a 2-D array with contiguous rows, got shape {a.shape} "
                         f"strides {a.strides}")
    return a


def vector(a, n: int, dtype, name: str):
    """A contiguous device vector of n entries of dtype (converted / copied if needed)."""
    cupy = import_cupy()
    a = cupy.ascontiguousarray(cupy.asarray(a), dtype=dtype)
    if a.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {a.shape}")
    return a


def head_rows(a, name: str, heads: int | None = None, head_dim: int | None = None):
    """[N, heads, D] fp16 with contiguous heads (row stride free); returns the row stride in elements."""
    cp = import_cupy()
    if not isinstance(a, cp.ndarray) or a.ndim != 3 or a.dtype != cp.float16:
        raise ValueError(f"{name}: expected a 3-D float16 CuPy array [rows, heads, head_dim], got "
                         f"{type(a).__name__} {getattr(a, 'shape', None)} {getattr(a, 'dtype', None)}")
    n, h, d = a.shape
    if (heads is not None and h != heads) or (head_dim is not None and d != head_dim):
        raise ValueError(f"{name}: expected [*, {heads}, {head_dim}], got {a.shape}")
    if a.strides[2] != 2 or (h > 1 and a.strides[1] != 2 * d):
        raise ValueError(f"{name}: heads must be contiguous within a row, got strides {a.strides}")
    ld = a.strides[0] // 2 if n > 1 else h * d
    if a.strides[0] % 2:
        raise ValueError(f"{name}: odd row stride")
    return ld


def int32_array(a, name: str, n: int | None = None):
    """A C-contiguous int32 device array (converted only if needed), with n entries if given."""
    cp = import_cupy()
    a = cp.asarray(a)
    if a.dtype != cp.int32 or not a.flags.c_contiguous:
        a = cp.ascontiguousarray(a, dtype=cp.int32)
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name}: expected {n} entries, got {a.shape}")
    return a


def pool_args(pool, layer: int):
    """(K pages, V pages, page_bytes) of a kernels/paged_kv.PagedKVPool's layer; null pointers for None."""
    if pool is None:
        return NULL, NULL, 0
    k_pool, v_pool = pool.k_pool(layer), pool.v_pool(layer)
    return k_pool, v_pool, pool.layout.page_bytes

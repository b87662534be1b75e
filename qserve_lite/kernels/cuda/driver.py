"""The two CUDA driver calls CuPy does not expose, through ctypes on libcuda: `cuTensorMapEncodeTiled` (the
TMA descriptors of the Hopper kernels) and `cuLaunchKernel` with raw parameter bytes (a descriptor is a
128-byte `__grid_constant__` parameter, which CuPy's argument packing cannot pass).

Launches go to CuPy's current stream, so they are ordered with CuPy's own work and captured into CUDA
graphs like any CuPy kernel. Encoded descriptors are cached on the host (a descriptor is plain bytes copied
into the launch's parameters, so a cached one can be dropped at any time).
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict

from qserve_lite.core.backend import import_cupy
from qserve_lite.errors import QServeLiteError

# CUtensorMapDataType / CUtensorMapSwizzle values (cuda.h)
TMA_U8, TMA_U64 = 0, 4
SWIZZLE_NONE, SWIZZLE_128B = 0, 3
_L2_PROMOTION_256B = 3
_ELEM_BYTES = {TMA_U8: 1, TMA_U64: 8}


class DriverError(QServeLiteError):
    """A CUDA driver call failed (the message names the call and the driver's error string)."""


_lock = threading.Lock()
_lib = None


def _libcuda():
    global _lib
    with _lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:
                raise DriverError(f"cannot load the CUDA driver library libcuda.so.1: {e}") from e
            u64p, u32p = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)
            ptr, i32 = ctypes.c_void_p, ctypes.c_int
            lib.cuTensorMapEncodeTiled.argtypes = [ptr, i32, ctypes.c_uint32, ptr, u64p, u64p, u32p, u32p,
                                                   i32, i32, i32, i32]
            lib.cuTensorMapEncodeTiled.restype = ctypes.c_int
            lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
                ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
            lib.cuLaunchKernel.restype = ctypes.c_int
            lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
            lib.cuGetErrorString.restype = ctypes.c_int
            _lib = lib
        return _lib


def _check(lib, rc: int, call: str) -> None:
    if rc != 0:
        msg = ctypes.c_char_p()
        lib.cuGetErrorString(rc, ctypes.byref(msg))
        text = msg.value.decode() if msg.value else "unknown error"
        raise DriverError(f"{call} failed: CUDA driver error {rc} ({text})")


class TensorMap:
    """One encoded CUtensorMap: 128 bytes in a 128-byte aligned host buffer (`address`)."""

    __slots__ = ("_buf", "address")

    def __init__(self):
        self._buf = ctypes.create_string_buffer(256)
        base = ctypes.addressof(self._buf)
        self.address = base + (-base % 128)


_MAPS_MAX = 4096
_maps: OrderedDict[tuple, TensorMap] = OrderedDict()


def tensor_map_2d(dtype: int, ptr: int, dims: tuple[int, int], row_stride: int, box: tuple[int, int],
                  swizzle: int) -> TensorMap:
    """The tiled 2-D descriptor of a row-major tensor: `dims` = (elements per row, rows), `row_stride` in
    bytes (a multiple of 16), `box` = the tile (elements, rows) one copy moves; out-of-range elements read as
    zero. Cached by its arguments."""
    key = (dtype, ptr, dims, row_stride, box, swizzle)
    with _lock:
        tm = _maps.get(key)
        if tm is not None:
            _maps.move_to_end(key)
            return tm
    lib = _libcuda()
    tm = TensorMap()
    gdim = (ctypes.c_uint64 * 2)(dims[0], dims[1])
    gstride = (ctypes.c_uint64 * 1)(row_stride)
    bdim = (ctypes.c_uint32 * 2)(box[0], box[1])
    estride = (ctypes.c_uint32 * 2)(1, 1)
    rc = lib.cuTensorMapEncodeTiled(ctypes.c_void_p(tm.address), dtype, 2, ctypes.c_void_p(ptr), gdim,
                                    gstride, bdim, estride, 0, swizzle, _L2_PROMOTION_256B, 0)
    _check(lib, rc, f"cuTensorMapEncodeTiled(dims={dims}, row_stride={row_stride}, box={box}, "
                    f"elem={_ELEM_BYTES[dtype]} B, swizzle={swizzle})")
    with _lock:
        _maps[key] = tm
        while len(_maps) > _MAPS_MAX:
            _maps.popitem(last=False)
    return tm


def launch(kernel, grid: tuple[int, int, int], block: int, smem: int, params: list) -> None:
    """cuLaunchKernel of a `cupy.RawKernel` on CuPy's current stream. `params` in the kernel's order: a
    TensorMap (passed by value), or a ctypes scalar (c_uint64 for pointers, c_int64, c_int32)."""
    cupy = import_cupy()
    lib = _libcuda()
    addrs = (ctypes.c_void_p * len(params))(
        *[p.address if isinstance(p, TensorMap) else ctypes.addressof(p) for p in params])
    stream = cupy.cuda.get_current_stream().ptr
    rc = lib.cuLaunchKernel(ctypes.c_void_p(kernel.kernel.ptr), grid[0], grid[1], grid[2], block, 1, 1, smem,
                            ctypes.c_void_p(stream), addrs, None)
    _check(lib, rc, f"cuLaunchKernel({kernel.__name__}, grid={grid}, block={block}, smem={smem})")

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
CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4


class _LaunchAttr(ctypes.Structure):
    """CUlaunchAttribute: an id, padding, then a 64-byte value union (here the cluster dimensions x, y, z)."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint32 * 16)]


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig of cuLaunchKernelEx."""

    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttr)), ("numAttrs", ctypes.c_uint)]


def _cluster_config(grid, block: int, smem: int, stream: int, cluster: int):
    """(config, attribute) of a launch in clusters of `cluster` blocks along x (keep both alive)."""
    attr = _LaunchAttr()
    attr.id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    attr.value[0], attr.value[1], attr.value[2] = cluster, 1, 1
    cfg = _LaunchConfig(grid[0], grid[1], grid[2], block, 1, 1, smem, ctypes.c_void_p(stream),
                        ctypes.pointer(attr), 1)
    return cfg, attr


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
            lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                             ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
            lib.cuLaunchKernelEx.restype = ctypes.c_int
            lib.cuOccupancyMaxActiveClusters.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p,
                                                         ctypes.POINTER(_LaunchConfig)]
            lib.cuOccupancyMaxActiveClusters.restype = ctypes.c_int
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


def launch(kernel, grid: tuple[int, int, int], block: int, smem: int, params: list, cluster: int = 1) -> None:
    """cuLaunchKernel of a `cupy.RawKernel` on CuPy's current stream (cuLaunchKernelEx in clusters of
    `cluster` blocks along x when > 1; grid[0] a multiple of it). `params` in the kernel's order: a TensorMap
    (passed by value), or a ctypes scalar (c_uint64 for pointers, c_int64, c_int32)."""
    cupy = import_cupy()
    lib = _libcuda()
    addrs = (ctypes.c_void_p * len(params))(
        *[p.address if isinstance(p, TensorMap) else ctypes.addressof(p) for p in params])
    stream = cupy.cuda.get_current_stream().ptr
    what = f"({kernel.__name__}, grid={grid}, block={block}, smem={smem}, cluster={cluster})"
    if cluster > 1:
        cfg, _attr = _cluster_config(grid, block, smem, stream, cluster)
        rc = lib.cuLaunchKernelEx(ctypes.byref(cfg), ctypes.c_void_p(kernel.kernel.ptr), addrs, None)
        _check(lib, rc, "cuLaunchKernelEx" + what)
        return
    rc = lib.cuLaunchKernel(ctypes.c_void_p(kernel.kernel.ptr), grid[0], grid[1], grid[2], block, 1, 1, smem,
                            ctypes.c_void_p(stream), addrs, None)
    _check(lib, rc, "cuLaunchKernel" + what)


_clusters: dict = {}


def max_active_clusters(kernel, block: int, smem: int, cluster: int, fallback: int) -> int:
    """How many clusters of `cluster` blocks of this kernel the GPU holds at once (cached per kernel and
    launch shape); `fallback` if the driver cannot say."""
    key = (kernel.kernel.ptr, block, smem, cluster)
    if key not in _clusters:
        lib = _libcuda()
        cfg, _attr = _cluster_config((cluster, 1, 1), block, smem, 0, cluster)
        n = ctypes.c_int(0)
        rc = lib.cuOccupancyMaxActiveClusters(ctypes.byref(n), ctypes.c_void_p(kernel.kernel.ptr),
                                              ctypes.byref(cfg))
        _clusters[key] = n.value if rc == 0 and n.value > 0 else fallback
    return _clusters[key]

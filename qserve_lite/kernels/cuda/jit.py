"""Compile and load the `.cu` sources of this folder with NVRTC through `cupy.RawModule`.

One module per (source, configuration macros, device): kernels are configured with `-D` macros (tile
sizes, modes) instead of C++ templates, so every entry point is a plain `extern "C"` name and only the
configurations a process uses get compiled. Compiled cubins land in CuPy's on-disk kernel cache
(`CUPY_CACHE_DIR`, default ~/.cupy/kernel_cache, keyed by source, options and NVRTC version), so a module
compiles once per machine; this module keeps the loaded ones in memory per process.

Hopper (compute capability 9.0) gets `-arch=sm_90a` in the options (CuPy also adds its own `-arch=sm_90`;
NVRTC 13 accepts both and builds the arch-specific target that wgmma/setmaxnreg need, as measured with
CuPy 14.2; tests/kernels/test_kernels_gpu.py checks it); every other GPU gets its native architecture from
CuPy. Only inline PTX is used (no mma.h, which the pip CUDA headers lack), and no CUDA header is included,
so the sources compile under nvcc and NVRTC alike.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

from qserve_lite.core.backend import import_cupy
from qserve_lite.errors import QServeLiteError

CUDA_DIR = Path(__file__).resolve().parent
BASE_OPTIONS = ("-std=c++17",)


class CudaCompileError(QServeLiteError):
    """A kernel source failed to compile; the message carries NVRTC's log."""


_lock = threading.Lock()
_modules: dict[tuple, object] = {}
_sources: dict[str, str] = {}


def arch_options(compute_capability: str | int) -> tuple[str, ...]:
    """Extra NVRTC options for a device: `-arch=sm_90a` on Hopper, nothing (CuPy's native arch) elsewhere."""
    return ("-arch=sm_90a",) if int(compute_capability) == 90 else ()


def define_options(defines: Mapping[str, int | str] | None) -> tuple[str, ...]:
    return tuple(f"-D{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted((defines or {}).items()))


def source_text(name: str) -> str:
    """The text of a `.cu` file of this folder with its local `#include "x.cuh"` headers inlined.

    Inlining keeps CuPy's cache key honest: the key hashes the source text, so a header edit must change it.
    """
    with _lock:
        text = _sources.get(name)
    if text is not None:
        return text
    lines = []
    for line in (CUDA_DIR / name).read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith('#include "') and stripped.endswith('.cuh"'):
            header = stripped[len('#include "') : -1]
            lines.append(f"// ---- {header} ----")
            lines.append(source_text(header))
        elif stripped == "#pragma once":
            continue
        else:
            lines.append(line)
    text = "\n".join(lines) + "\n"
    with _lock:
        _sources[name] = text
    return text


def load_module(name: str, defines: Mapping[str, int | str] | None = None):
    """The compiled `cupy.RawModule` of `qserve_lite/kernels/cuda/<name>` with these `-D` macros, current
    device.

    Raises CudaCompileError (with the compiler log) if NVRTC rejects the source.
    """
    cupy = import_cupy()
    dev = cupy.cuda.Device()
    cc = dev.compute_capability
    key = (name, define_options(defines), dev.id)
    with _lock:
        mod = _modules.get(key)
    if mod is not None:
        return mod
    options = BASE_OPTIONS + key[1] + arch_options(cc)
    mod = cupy.RawModule(code=source_text(name), options=options)
    try:
        mod.compile()
    except Exception as e:  # cupy.cuda.compiler.CompileException and driver load errors
        raise CudaCompileError(
            f"compiling qserve_lite/kernels/cuda/{name} for sm_{cc} with options {' '.join(options)} "
            f"failed:\n{e}"
        ) from e
    with _lock:
        _modules.setdefault(key, mod)
        return _modules[key]


def get_kernel(name: str, entry: str, defines: Mapping[str, int | str] | None = None, dynamic_smem: int = 0):
    """The `extern "C"` kernel `entry` of `name` (a `cupy.RawKernel`), with its dynamic shared memory limit
    raised to `dynamic_smem` bytes where that approaches the default 48 KB."""
    mod = load_module(name, defines)
    try:
        kern = mod.get_function(entry)
    except Exception as e:
        raise CudaCompileError(f"qserve_lite/kernels/cuda/{name} has no kernel {entry!r}: {e}") from e
    # Opt in whenever the dynamic size is near the 48 KB default: static shared memory counts against it too.
    if dynamic_smem > 40 * 1024 and kern.max_dynamic_shared_size_bytes < dynamic_smem:
        kern.max_dynamic_shared_size_bytes = dynamic_smem
    return kern


_geometry: dict[tuple, int] = {}


def get_sized_kernel(name: str, entry: str, defines: Mapping[str, int | str], threads: int):
    """(kernel, dynamic shared memory bytes) of a module that states its own launch geometry: `extern "C"
    __device__ const int` symbols <entry>_smem_bytes and <entry>_threads. The module's thread count must equal
    the launcher's `threads` (its copy of the configuration); both are read once per configuration."""
    key = (name, entry, define_options(defines))
    smem = _geometry.get(key)
    if smem is None:
        smem = read_global_int(name, f"{entry}_smem_bytes", defines)
        module_threads = read_global_int(name, f"{entry}_threads", defines)
        assert module_threads == threads, (name, dict(defines), module_threads, threads)
        _geometry[key] = smem
    return get_kernel(name, entry, defines, dynamic_smem=smem), smem


def read_global_int(name: str, symbol: str, defines: Mapping[str, int | str] | None = None) -> int:
    """Value of an `extern "C" __device__ const int` of a module (used to check launch geometry)."""
    cupy = import_cupy()
    mod = load_module(name, defines)
    ptr = mod.get_global(symbol)
    return int(cupy.ndarray((1,), cupy.int32, ptr).get()[0])

"""Backends: which device the engine runs on ('cpu': numpy, 'gpu': CuPy; 'auto' picks the GPU when cupy is
installed and sees a CUDA device), and the one answer to "is this CuPy?" for every layer above.

Arrays of either backend flow through the same code; `array_module` picks the module of given arrays,
`is_cupy` tells a cupy module or array, `to_host` copies back to numpy, `import_cupy` imports cupy or says
how to install it.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from qserve_lite.errors import DeviceError

DEVICES = ("cpu", "gpu", "auto")


def gpu_unavailable_reason() -> str | None:
    """None if cupy imports and sees at least one CUDA device; otherwise why not."""
    if importlib.util.find_spec("cupy") is None:
        return "cupy is not installed (pip install cupy-cuda12x or cupy-cuda13x)"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "cupy sees no CUDA device"
    except Exception as e:  # noqa: BLE001 - driver / runtime problems surface in many types
        return f"cupy cannot reach a CUDA device ({type(e).__name__}: {e})"
    return None


def resolve_device(requested: str) -> str:
    """'cpu', 'gpu' or 'auto' -> 'cpu' or 'gpu'; raises DeviceError for an unusable 'gpu' or a bad name."""
    if requested not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "cpu":
        return "cpu"
    reason = gpu_unavailable_reason()
    if requested == "auto":
        return "cpu" if reason else "gpu"
    if reason:
        raise DeviceError(
            f"--device gpu needs cupy and a CUDA device: {reason}. Use --device cpu "
            "(the numpy reference engine)"
        )
    return "gpu"


def import_cupy():
    """The cupy module, or a DeviceError that says how to install it."""
    try:
        import cupy
    except ImportError as e:
        raise DeviceError("the GPU path needs CuPy: pip install 'qserve-lite[cuda13]' (or [cuda12])") from e
    return cupy


def is_cupy(obj) -> bool:
    """True for the cupy module itself or a cupy array (never imports cupy)."""
    if getattr(obj, "__name__", None) == "cupy":
        return True
    return type(obj).__module__.split(".")[0] == "cupy"


def array_module(*arrays):
    """cupy if any of `arrays` (None entries ignored) is a cupy array, else numpy."""
    if any(a is not None and is_cupy(a) for a in arrays):
        return import_cupy()
    return np


def to_host(a) -> np.ndarray:
    """A numpy copy (or view) of a cupy or numpy array."""
    return a.get() if is_cupy(a) else np.asarray(a)


def memory_pool_gb(xp) -> float | None:
    """GB held by cupy's default memory pool (its high-water mark while nothing frees the pool's blocks:
    what the process has taken from the GPU, less the CUDA context); None for numpy."""
    if not is_cupy(xp):
        return None
    return xp.get_default_memory_pool().total_bytes() / 1e9


def device_array_module(device: str):
    """numpy for a device that resolves to 'cpu', cupy for 'gpu' (resolve_device's rules)."""
    return np if resolve_device(device) == "cpu" else import_cupy()


class HostCopy:
    """A device array on its way to the host: the copy is queued behind the work that produces it, and
    `wait()` blocks until it has landed (numpy arrays are already there)."""

    def __init__(self, a):
        if not is_cupy(a):
            self._host, self._event = np.asarray(a), None
            return
        cupy = import_cupy()
        import cupyx  # with cupy: pinned host memory

        self._host = cupyx.empty_pinned(a.shape, dtype=a.dtype)
        a.get(out=self._host, blocking=False)
        self._event = cupy.cuda.Event(disable_timing=True)
        self._event.record()

    def wait(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host

"""Which device the engine runs on: 'cpu' (the numpy runner) or 'gpu' (the CuPy runner); 'auto' picks the GPU
when cupy is installed and sees a CUDA device."""

from __future__ import annotations

import importlib.util

from ..errors import DeviceError

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

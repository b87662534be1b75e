"""Properties of the current CUDA device, cached per device: SM count, shared memory per SM, and whether
the Hopper (sm_90a) paths are available. Read by the launchers' heuristics."""

from __future__ import annotations

import threading

from qserve_lite.core.backend import import_cupy
from qserve_lite.kernels.cuda.jit import load_module, read_global_int

_lock = threading.Lock()
_props: dict[int, dict] = {}


def _device_props() -> dict:
    cupy = import_cupy()
    dev = cupy.cuda.Device()
    with _lock:
        props = _props.get(dev.id)
        if props is None:
            props = cupy.cuda.runtime.getDeviceProperties(dev.id)
            _props[dev.id] = props
    return props


def sm_count() -> int:
    return int(_device_props()["multiProcessorCount"])


def smem_per_sm() -> int:
    return int(_device_props().get("sharedMemPerMultiprocessor", 228 * 1024))


def wgmma_available() -> bool:
    """Hopper (sm_90a) tensor-core path available on the current device."""
    return int(import_cupy().cuda.Device().compute_capability) == 90


def sm90a_active() -> bool:
    """True if modules of this device compile for the arch-specific sm_90a target (Hopper only)."""
    mod = load_module("arch_probe.cu")
    del mod
    return read_global_int("arch_probe.cu", "qs_arch_feature_sm90a") == 1

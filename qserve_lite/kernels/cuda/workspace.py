"""Split-K workspaces: partial sums and arrival counters of the kernels that split their reduction across
blocks, one set per (device, stream), grown on demand.

Two module-level workspaces: `gemm_workspace` (int32 partials of cuda/gemm.cu and cuda/gemm_skinny.cu) and
`attention_workspace` (fp32 (o, m, l) partials of the decode attention of cuda/attention.cu, unless the
caller passes its own).

CUDA graphs: a captured graph bakes in the workspace pointers of its stream, but a later, larger call on
that stream may grow (replace) them. `pin_workspaces(stream)` returns the buffers in use for (current device,
stream) so the graph's owner can hold them for as long as it replays the graph; `release_workspaces(stream)`
drops them from the workspaces (e.g. when the graphs are released), so the next call allocates afresh.
"""

from __future__ import annotations

import threading

from qserve_lite.core.backend import import_cupy


class Workspace:
    """Split-K partials and arrival counters, one set per (device, stream), each grown on demand (to at least
    the given minimum sizes). The counters are zeroed once: each kernel call's last block resets its own."""

    def __init__(self, dtype: str, min_elems: int, min_counters: int):
        self.dtype, self.min_elems, self.min_counters = dtype, min_elems, min_counters
        self.lock = threading.Lock()
        self.bufs: dict[tuple[int, int], tuple] = {}

    def get(self, elems: int, counters_needed: int):
        cupy = import_cupy()
        key = (cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr)
        with self.lock:
            part, counters = self.bufs.get(key, (None, None))
            if part is None or part.size < elems:
                part = cupy.empty(max(elems, self.min_elems), dtype=self.dtype)
            if counters is None or counters.size < counters_needed:
                counters = cupy.zeros(max(counters_needed, self.min_counters), dtype=cupy.int32)
            self.bufs[key] = (part, counters)
            return part, counters


gemm_workspace = Workspace("int32", 1 << 16, 1024)  # GEMM split-K: int32 partial sums
attention_workspace = Workspace("float32", 1 << 16, 4096)  # decode split-K: (o, m, l) partials
WORKSPACES = (gemm_workspace, attention_workspace)


def _key(stream) -> tuple[int, int]:
    return import_cupy().cuda.Device().id, stream.ptr


def pin_workspaces(stream) -> list:
    """The current (partials, counters) of every split-K workspace for (current device, `stream`), one
    entry per workspace (None where it has none yet): hold them while a graph captured on `stream` lives."""
    key = _key(stream)
    pinned = []
    for workspace in WORKSPACES:
        with workspace.lock:
            pinned.append(workspace.bufs.get(key))
    return pinned


def release_workspaces(stream) -> None:
    """Drop every split-K workspace's buffers for (current device, `stream`)."""
    key = _key(stream)
    for workspace in WORKSPACES:
        with workspace.lock:
            workspace.bufs.pop(key, None)

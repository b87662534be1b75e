"""qoq._LayerIO: the quantizer's read-ahead of float layers and background writes of quantized ones."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from qserve_lite.quant.qoq import _LayerIO


class Recorder:
    def __init__(self, fail_write: int | None = None):
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.fail_write = fail_write

    def read_layer(self, i):
        time.sleep(0.02)
        with self.lock:
            self.events.append(("read", i))
        return f"float{i}"

    def add_layer(self, i, lw):
        time.sleep(0.02)
        if i == self.fail_write:
            raise OSError(f"disk full at layer {i}")
        with self.lock:
            self.events.append(("write", i, lw))


def test_reads_ahead_and_writes_in_order():
    rec = Recorder()
    weights = SimpleNamespace(layers=[None] * 4)
    seen = []
    with _LayerIO(weights, rec.read_layer, rec) as io:
        for i in range(4):
            seen.append(io.take(i))
            time.sleep(0.1)  # the "quantization" of layer i: layer i + 1 is read meanwhile, in the background
            with rec.lock:
                assert i == 3 or ("read", i + 1) in rec.events
            io.put(i, f"q{i}")
    assert seen == [f"float{i}" for i in range(4)]
    writes = [e for e in rec.events if e[0] == "write"]
    assert writes == [("write", i, f"q{i}") for i in range(4)]  # every layer written before the exit
    assert weights.layers == [None] * 4  # a sink gets them; memory keeps none
    assert sorted(e[1] for e in rec.events if e[0] == "read") == [0, 1, 2, 3]  # each layer read once


def test_layers_already_in_memory_are_not_read_and_stay_without_a_sink():
    rec = Recorder()
    weights = SimpleNamespace(layers=["a", None, "c"])
    with _LayerIO(weights, rec.read_layer, None) as io:
        got = [io.take(i) for i in range(3)]
        for i in range(3):
            io.put(i, f"q{i}")
    assert got == ["a", "float1", "c"]
    assert [e for e in rec.events if e[0] == "read"] == [("read", 1)]
    assert weights.layers == ["q0", "q1", "q2"]


def test_a_failed_write_surfaces_and_nothing_runs_after_exit():
    rec = Recorder(fail_write=1)
    weights = SimpleNamespace(layers=[None] * 4)
    with pytest.raises(OSError, match="disk full at layer 1"):
        with _LayerIO(weights, rec.read_layer, rec) as io:
            for i in range(4):
                io.take(i)
                io.put(i, f"q{i}")
    n = len(rec.events)
    time.sleep(0.1)
    assert len(rec.events) == n  # no background task is left running
    assert ("write", 2, "q2") not in rec.events  # layer 2's write waited for layer 1's, which failed


def test_a_missing_reader_is_an_error():
    weights = SimpleNamespace(layers=[None])
    with pytest.raises(ValueError, match="no read_layer"):
        with _LayerIO(weights, None, None) as io:
            io.take(0)

"""kernels/cuda/jit.get_sized_kernel: the launch geometry a module states (<entry>_smem_bytes and
<entry>_threads) is read once per configuration, checked against the launcher's thread count, and its
shared memory passed on."""

from __future__ import annotations

import pytest

from qserve_lite.kernels.cuda import jit


@pytest.fixture
def fake_module(monkeypatch):
    reads, launches = [], []
    values = {"k_smem_bytes": 200_000, "k_threads": 384}

    def read_global_int(name, symbol, defines=None):
        reads.append((name, symbol, dict(defines)))
        return values[symbol]

    def get_kernel(name, entry, defines=None, dynamic_smem=0):
        launches.append((name, entry, dynamic_smem))
        return f"kernel:{entry}"

    monkeypatch.setattr(jit, "read_global_int", read_global_int)
    monkeypatch.setattr(jit, "get_kernel", get_kernel)
    monkeypatch.setattr(jit, "_geometry", {})
    return reads, launches, values


def test_geometry_read_once_per_configuration(fake_module):
    reads, launches, _ = fake_module
    for _ in range(3):
        assert jit.get_sized_kernel("x.cu", "k", {"A": 1}, 384) == ("kernel:k", 200_000)
    assert [r[1] for r in reads] == ["k_smem_bytes", "k_threads"]
    assert launches == [("x.cu", "k", 200_000)] * 3
    jit.get_sized_kernel("x.cu", "k", {"A": 2}, 384)  # another configuration: read again
    assert len(reads) == 4 and reads[-1][2] == {"A": 2}


def test_thread_count_mismatch_is_caught(fake_module):
    with pytest.raises(AssertionError):
        jit.get_sized_kernel("x.cu", "k", {"A": 1}, 256)

"""The CPU engine's BLAS thread policy (core/threads.py): what the environment asks for, the free cores a
step gets, and the load meter. No timings: the measurements behind the policy are in the module docstring."""

from __future__ import annotations

import os

import pytest

from qserve_lite.core.threads import (
    BLAS_THREADS_ENV,
    FREE,
    MIN_WINDOW_S,
    BlasPolicy,
    BlasThreads,
    CpuLoadMeter,
    blas_policy,
    free_cores,
    machine_busy_seconds,
)
from qserve_lite.errors import ConfigError

AUTO = BlasPolicy(FREE, "auto")


@pytest.mark.parametrize("environ, expected", [
    ({}, AUTO),
    ({"OPENBLAS_NUM_THREADS": ""}, AUTO),  # set but empty: not a choice
    ({"PATH": "/bin"}, AUTO),
    ({"OPENBLAS_NUM_THREADS": "2"}, BlasPolicy(None, "OPENBLAS_NUM_THREADS is set")),
    ({"OMP_NUM_THREADS": "4"}, BlasPolicy(None, "OMP_NUM_THREADS is set")),
    ({"MKL_NUM_THREADS": "1"}, BlasPolicy(None, "MKL_NUM_THREADS is set")),
    ({BLAS_THREADS_ENV: "3"}, BlasPolicy(3, f"{BLAS_THREADS_ENV}=3")),
    # ours wins over a BLAS variable
    ({BLAS_THREADS_ENV: " 2 ", "OMP_NUM_THREADS": "1"}, BlasPolicy(2, f"{BLAS_THREADS_ENV}=2")),
    ({BLAS_THREADS_ENV: "auto", "OPENBLAS_NUM_THREADS": "2"}, AUTO),
    ({BLAS_THREADS_ENV: "AUTO"}, AUTO),
    ({BLAS_THREADS_ENV: ""}, AUTO),
    ({BLAS_THREADS_ENV: "off"}, BlasPolicy(None, f"{BLAS_THREADS_ENV}=off")),
])
def test_policy_from_environment(environ, expected):
    assert blas_policy(environ) == expected


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_thread_count_is_refused(value):
    with pytest.raises(ConfigError, match=BLAS_THREADS_ENV):
        blas_policy({BLAS_THREADS_ENV: value})


@pytest.mark.parametrize("cores, others, expected", [
    (2, 0.0, 2), (2, 0.1, 2), (2, 0.3, 1), (2, 1.0, 1), (2, 2.0, 1), (2, 5.0, 1),
    (1, 0.0, 1), (4, 0.5, 3), (8, 3.0, 5), (8, 0.0, 8),
    (2, None, 1), (8, None, 1),  # load unknown: 1 thread
])
def test_free_cores(cores, others, expected):
    assert free_cores(cores, others) == expected


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_load_meter_subtracts_own_cpu_time():
    clock = FakeClock()
    counters = {"busy": 1000.0, "own": 5.0}
    meter = CpuLoadMeter(busy=lambda: counters["busy"], own=lambda: counters["own"], clock=clock,
                         sleep=clock.sleep)
    clock.t += 2.0
    counters["busy"] += 3.0  # the machine was busy 3 core-seconds in 2 s ...
    counters["own"] += 1.0  # ... 1 of them ours
    assert meter.others_busy() == pytest.approx(1.0)
    clock.t += 1.0
    counters["busy"] += 0.5
    counters["own"] += 0.5  # all of it ours
    assert meter.others_busy() == pytest.approx(0.0)


def test_load_meter_waits_out_a_short_first_window():
    clock = FakeClock()
    meter = CpuLoadMeter(busy=lambda: 50.0, own=lambda: 1.0, clock=clock, sleep=clock.sleep)
    t0 = clock.t
    assert meter.others_busy() == 0.0
    assert clock.t - t0 == pytest.approx(MIN_WINDOW_S)


def test_load_meter_short_windows_repeat_the_last_reading():
    """Only the first reading waits; a big step soon after another gets the previous reading, and the window
    goes on until it is long enough."""
    clock = FakeClock()
    counters = {"busy": 0.0, "own": 0.0}
    meter = CpuLoadMeter(busy=lambda: counters["busy"], own=lambda: counters["own"], clock=clock,
                         sleep=clock.sleep)
    counters["busy"] += MIN_WINDOW_S  # another process busy through the first window
    assert meter.others_busy() == pytest.approx(1.0)
    t0 = clock.t
    clock.t += MIN_WINDOW_S / 4
    assert meter.others_busy() == pytest.approx(1.0) and clock.t == t0 + MIN_WINDOW_S / 4  # no wait
    clock.t += MIN_WINDOW_S
    assert meter.others_busy() == pytest.approx(0.0)  # the whole window since the first reading: idle


def test_load_meter_unknown_without_proc_stat():
    clock = FakeClock()
    meter = CpuLoadMeter(busy=lambda: None, own=lambda: 1.0, clock=clock, sleep=clock.sleep)
    clock.t += 1.0
    assert meter.others_busy() is None


def test_machine_busy_seconds(tmp_path):
    """user + nice + system + irq + softirq + steal ticks, in seconds."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 1000 20 5 5 40 0 0\ncpu0 50 0 25 500 10 2 3 20 0 0\n")
    assert machine_busy_seconds(str(stat)) == pytest.approx(200 / os.sysconf("SC_CLK_TCK"))
    assert machine_busy_seconds(str(tmp_path / "missing")) is None


class FixedLoad:
    def __init__(self, others):
        self.others = others

    def others_busy(self):
        return self.others


def test_threads_per_step(monkeypatch):
    """Auto: the free cores of the latest reading; a fixed count: that count; off: nothing."""
    monkeypatch.setattr(BlasThreads, "__init__", lambda self, policy, meter=None, cores=None: None)

    def blas(policy, others=0.0, cores=2):
        b = BlasThreads(policy)
        b.policy, b._meter, b.cores = policy, FixedLoad(others), cores
        return b

    assert blas(AUTO).threads_now() == 2
    assert blas(AUTO, cores=8, others=3.0).threads_now() == 5
    assert blas(AUTO, others=1.0).threads_now() == 1
    assert blas(AUTO, others=None).threads_now() == 1
    assert blas(BlasPolicy(3, "fixed"), others=5.0).threads_now() == 3
    assert blas(BlasPolicy(None, "off")).threads_now() is None

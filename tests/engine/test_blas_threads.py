"""An engine on the CPU sets its BLAS threads (core/threads.py) when it is built and before each step, as
threadpoolctl reports them; an explicit user setting wins. The machine's load is faked; no timings."""

from __future__ import annotations

import pytest
from threadpoolctl import ThreadpoolController, threadpool_info

from qserve_lite.core import threads
from qserve_lite.core.threads import BLAS_THREADS_ENV, USER_THREAD_VARS, BlasThreads, blas_library_threads
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.errors import ConfigError
from qserve_lite.io.loader import load_model
from qserve_lite.sampling_params import SamplingParams


def blas_threads() -> set[int]:
    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


class FakeLoad:
    """Stands in for CpuLoadMeter: `others` cores busy with other processes."""

    def __init__(self, others: float):
        self.others = others

    def others_busy(self) -> float:
        return self.others


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture
def load(monkeypatch):
    """A clean environment (no thread variables), a machine of 2 cores whose load the test sets
    (load.others), and the process's BLAS threads put back afterwards."""
    for var in (BLAS_THREADS_ENV, *USER_THREAD_VARS):
        monkeypatch.delenv(var, raising=False)
    controller = ThreadpoolController().select(user_api="blas")
    if not controller.lib_controllers or blas_library_threads() < 2:
        pytest.skip("no BLAS library under numpy that runs 2 threads here")
    before = {lib.prefix: lib.num_threads for lib in controller.lib_controllers}
    fake = FakeLoad(0.0)
    monkeypatch.setattr(threads, "CpuLoadMeter", lambda **_: fake)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    yield fake
    controller.limit(limits=before)


def test_cpu_engine_on_an_idle_machine_uses_every_core(tiny, load):
    ThreadpoolController().limit(limits=1, user_api="blas")
    engine = LLMEngine(tiny, num_pages=16)
    assert blas_threads() == {2} and engine.blas_threads.current == 2


def test_cpu_engine_beside_a_busy_process_uses_one_thread(tiny, load):
    load.others = 1.0
    engine = LLMEngine(tiny, num_pages=16)
    assert blas_threads() == {1} and engine.blas_threads.current == 1


def test_steps_follow_the_load(tiny, load):
    """Each step runs on the threads of the latest load reading."""
    engine = LLMEngine(tiny, num_pages=16)
    seen = []
    run = engine.runner.run

    def recording(seqs, is_prefill):
        seen.append(blas_threads())
        load.others = 1.0 if len(seen) % 2 else 0.0  # another process starts and stops
        return run(seqs, is_prefill)

    engine.runner.run = recording
    engine.add_request([3, 4, 5, 6], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert seen == [{2}, {1}, {2}, {1}]


def test_user_blas_variable_wins(tiny, load, monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    load.others = 1.0
    ThreadpoolController().limit(limits=2, user_api="blas")  # as the library would have read it at import
    engine = LLMEngine(tiny, num_pages=16)
    assert not engine.blas_threads.policy.managed
    assert blas_threads() == {2}


def test_our_variable_sets_the_threads(tiny, load, monkeypatch):
    monkeypatch.setenv(BLAS_THREADS_ENV, "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # ours is the more specific one
    engine = LLMEngine(tiny, num_pages=16)
    assert engine.blas_threads.policy.threads == 1
    assert blas_threads() == {1}


def test_bad_thread_variable_fails_the_build(tiny, load, monkeypatch):
    monkeypatch.setenv(BLAS_THREADS_ENV, "many")
    with pytest.raises(ConfigError, match=BLAS_THREADS_ENV):
        LLMEngine(tiny, num_pages=16)


class DeviceRunner:
    """A runner whose arrays live on a device (not numpy), as the GPU runner's do."""

    xp = object()
    num_pages = 16

    def __init__(self, cfg):
        self.cfg = cfg


def test_device_engine_leaves_blas_alone(tiny, load):
    load.others = 1.0
    ThreadpoolController().limit(limits=2, user_api="blas")
    engine = LLMEngine(None, runner=DeviceRunner(tiny.config))
    assert not engine.blas_threads.policy.managed
    assert blas_threads() == {2}
    assert BlasThreads.off().current is None

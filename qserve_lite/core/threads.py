"""BLAS threads on the CPU: the engine picks them itself (issue 21).

numpy's BLAS (OpenBLAS) starts one thread per core, and its threads wait for each other inside every matmul.
When another process holds a core, a BLAS thread that the OS has descheduled stalls the whole step. On a
2-core machine with one busy process beside it, `qserve-lite generate` (64 tokens) ran at 12-13 tok/s on the
library's 2 threads and 30 tok/s on 1; with two busy processes, 10-11 and 24. On the idle machine 2 threads
were the faster: 1.2-1.4x for generate, for a 32-token streamed completion from the server and for a
1024-token prefill. So in auto mode (BlasThreads, applied by LLMEngine when its runner is on the CPU) each
step runs on one BLAS thread per core that other processes leave free (free_cores): the machine's busy time
from /proc/stat minus this process's own, re-read at most every MIN_WINDOW_S (CpuLoadMeter); 1 thread where
that cannot be read (not Linux).

The user's choice wins: QSERVE_LITE_BLAS_THREADS=N runs every step on N threads, =off leaves BLAS as the
library set it, =auto is the policy above; without it, a BLAS variable the user set (OPENBLAS_NUM_THREADS,
OMP_NUM_THREADS, MKL_NUM_THREADS, ...) leaves BLAS alone. BLAS has one thread pool per process, so the
limit holds for the whole process (other numpy code in it included) once a CPU engine is built.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

from threadpoolctl import ThreadpoolController

from qserve_lite.errors import ConfigError

BLAS_THREADS_ENV = "QSERVE_LITE_BLAS_THREADS"
# variables through which a user sets BLAS threads; any of them set: the engine leaves BLAS alone
USER_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                    "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
FREE = "free"  # the auto policy: one thread per core that other processes leave free
FREE_SLACK = 0.2  # a core counts as free while other processes use less than this share of it
MIN_WINDOW_S = 0.25  # the shortest window a load reading is taken over (/proc/stat counts 10 ms ticks)


@dataclass(frozen=True)
class BlasPolicy:
    """threads: a BLAS thread count for every step, FREE (the cores other processes leave free, per step),
    or None (leave BLAS alone); reason: where the policy came from."""

    threads: int | str | None
    reason: str

    @property
    def managed(self) -> bool:
        return self.threads is not None


def blas_policy(environ=None) -> BlasPolicy:
    """The policy the environment asks for (module docstring): QSERVE_LITE_BLAS_THREADS, else a user's BLAS
    variable, else auto."""
    environ = os.environ if environ is None else environ
    ours = environ.get(BLAS_THREADS_ENV, "").strip().lower()
    if ours == "off":
        return BlasPolicy(None, f"{BLAS_THREADS_ENV}=off")
    if ours and ours != "auto":
        if not ours.isdigit() or int(ours) < 1:
            raise ConfigError(f"{BLAS_THREADS_ENV} must be a number of threads >= 1, 'auto' or 'off', "
                              f"got {environ[BLAS_THREADS_ENV]!r}")
        return BlasPolicy(int(ours), f"{BLAS_THREADS_ENV}={int(ours)}")
    if not ours:
        for var in USER_THREAD_VARS:
            if environ.get(var, "").strip():
                return BlasPolicy(None, f"{var} is set")
    return BlasPolicy(FREE, "auto")


def free_cores(cores: int, others_busy: float | None) -> int:
    """BLAS threads for a step: the cores that other processes (busy `others_busy` cores on average) leave
    free, at least 1; 1 when the load is unknown."""
    if others_busy is None:
        return 1
    return max(1, min(cores, int(cores - others_busy + FREE_SLACK)))


def usable_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_busy_seconds(path: str = "/proc/stat") -> float | None:
    """CPU seconds every core of the machine has spent busy since boot (steal included: time another guest
    had the core), from /proc/stat; None where there is none (not Linux)."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


class CpuLoadMeter:
    """Cores kept busy by other processes: the machine's busy CPU time minus this process's own, over the
    wall time since the previous reading. Within MIN_WINDOW_S of a reading it gives that reading again (a
    first reading that soon waits out the rest of its window)."""

    def __init__(self, busy=None, own=time.process_time, clock=time.monotonic, sleep=time.sleep,
                 since: tuple[float, float | None, float] | None = None):
        self._busy = busy or machine_busy_seconds
        self._own, self._clock, self._sleep = own, clock, sleep
        self._since = since or self._sample()  # (wall clock, machine busy s, own CPU s) the window starts at
        self._last: float | None = None
        self._read_once = False

    def _sample(self) -> tuple[float, float | None, float]:
        return self._clock(), self._busy(), self._own()

    def others_busy(self) -> float | None:
        """Average cores busy with other processes over the last window; None where unknown."""
        start = self._since
        if start[1] is None:
            return None
        wait = MIN_WINDOW_S - (self._clock() - start[0])
        if wait > 0 and self._read_once:
            return self._last
        if wait > 0:
            self._sleep(wait)
        now = self._sample()
        self._since, self._read_once = now, True
        if now[1] is None or now[0] <= start[0]:
            self._last = None
        else:
            self._last = max(0.0, ((now[1] - start[1]) - (now[2] - start[2])) / (now[0] - start[0]))
        return self._last


# an engine's first load window starts when the package is imported: by the time the engine is built it has
# the model's loading behind it, and its first reading needs no wait
_IMPORTED = (time.monotonic(), machine_busy_seconds(), time.process_time())


@functools.cache
def _blas_controller() -> tuple[ThreadpoolController, int]:
    """threadpoolctl's handle on the loaded BLAS libraries, and their threads before any limit."""
    controller = ThreadpoolController().select(user_api="blas")
    return controller, max([lib.num_threads for lib in controller.lib_controllers], default=1)


def blas_library_threads() -> int:
    """The BLAS threads numpy's library started with (before any engine limited them; 1 if none is found)."""
    return _blas_controller()[1]


class BlasThreads:
    """The BLAS threads of one CPU engine (module docstring): set when it is built (for_cpu_engine) and
    before each of its steps (before_step); `current`: the count of the last step (None: BLAS left alone)."""

    def __init__(self, policy: BlasPolicy, meter: CpuLoadMeter | None = None, cores: int | None = None):
        self.policy = policy
        self.current: int | None = None
        self.cores = 1
        self._meter = meter
        self._controller = None
        if not policy.managed:
            return
        self._controller = _blas_controller()[0]
        self.cores = max(1, min(usable_cores() if cores is None else cores, blas_library_threads()))
        if policy.threads == FREE and self._meter is None:
            self._meter = CpuLoadMeter(since=_IMPORTED)
        self.before_step()

    @classmethod
    def for_cpu_engine(cls, environ=None) -> BlasThreads:
        return cls(blas_policy(environ))

    @classmethod
    def off(cls) -> BlasThreads:
        """Leaves BLAS alone (an engine on the GPU)."""
        return cls(BlasPolicy(None, "not on the CPU"))

    def threads_now(self) -> int | None:
        """The BLAS threads the next step gets; None: leave them as they are."""
        if self.policy.threads == FREE:
            return free_cores(self.cores, self._meter.others_busy())
        return self.policy.threads

    def before_step(self) -> None:
        """Set BLAS to the threads the next step gets, where it runs another count (read from the calling
        thread: an OpenMP BLAS keeps one per thread, and the server steps on a thread of its own)."""
        n = self.threads_now()
        if n is None:
            return
        if any(lib.num_threads != n for lib in self._controller.lib_controllers):
            self._controller.limit(limits=n)
        self.current = n

    def describe(self) -> str:
        p = self.policy
        if not p.managed:
            return f"BLAS threads left alone ({p.reason})"
        what = "one per core other processes leave free" if p.threads == FREE else str(p.threads)
        return f"BLAS threads: {what} ({p.reason}; now {self.current})"
